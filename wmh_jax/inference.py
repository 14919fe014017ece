"""Inference: segment one scan, from its FLAIR to the native lesion mask.

The one per-scan pipeline that ``predict``, ``evaluate`` and the refiner's fit
(``train.fit_refiner``) all call (:func:`segment`):

  read (``read_scan``: canonical RAS, the whole scan onto ``data.grid`` (along Z
  its own slices with ``data.grid_max_depth``: ``subjects.scan_grid``) by
  ``subjects.preprocess``, as training sees it) -> network
  (``make_probability_fn``: ensemble members and flip TTA) -> native grid
  (``native_probability``: resized back; with a brain output the native brain
  mask, and no lesion outside it) -> with ``data.input_norm='brain'``, the
  network again on the scan z-scored in that brain, for the lesion -> refine
  (the native refiner of ``wmh_jax.refine`` on the FLAIR z-scored in that
  brain) -> threshold
  (``predict.threshold`` without a refiner, else the refiner's own).

``load`` restores what inference needs from a workdir (the weights only,
``checkpoints.restore_weights``, and the refiner); a :class:`Segmentation`
holds every stage's result a caller writes or scores.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Any, Callable

from absl import logging
import jax
import numpy as np
from scipy import ndimage

from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import steps
from wmh_jax import subjects


def flip_sets(axes) -> list[tuple[int, ...]]:
  """Every subset of ``axes`` (grid axes 0..2), the identity first."""
  return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def has_brain_output(model, state) -> bool:
  """Whether ``model`` has a brain output that training reached.

  A brain channel that never saw a brain mask (no ``brain.nii.gz`` among the
  training subjects, e.g. a TFDS dataset) keeps its initial bias of exactly 0:
  without a gradient Adam moves nothing. Its output is noise, so it is not used.
  """
  if not getattr(model, 'brain_output', False):
    return False
  if float(np.asarray(models.output_bias(state.params))[1]) == 0.0:
    logging.warning('model.brain_output: the brain channel was never trained (no '
                    'brain.nii.gz among the training subjects); it is ignored')
    return False
  return True


def split_probability(out) -> tuple[np.ndarray, np.ndarray | None]:
  """``(lesion, brain or None)`` from a probability function's output: one
  array (lesion only) or a ``(lesion, brain)`` pair."""
  if isinstance(out, tuple):
    return out[0], out[1]
  return out, None


def make_probability_fn(members, tta_axes=()):
  """``grid image (X,Y,Z) -> mean lesion probability (X,Y,Z)``, or the pair
  ``(lesion, brain)`` of mean probabilities when every member has a trained brain
  output (:func:`has_brain_output`).

  ``members`` are ``(model, state)`` pairs (an ensemble); with ``tta_axes`` each
  member also sees the image flipped along every subset of those axes, and the
  probabilities are flipped back before averaging.
  """
  fns = [(functools.partial(steps.predict_logits_jit, model=m),
          steps.inference_weights(s)) for m, s in members]
  brain = all(has_brain_output(m, s) for m, s in members)
  flips = flip_sets(tuple(tta_axes))

  def probability(grid_image: np.ndarray):
    total = np.zeros((2 if brain else 1, *grid_image.shape), np.float64)
    for fn, state in fns:
      for axes in flips:
        x = np.flip(grid_image, axes) if axes else grid_image
        logits = fn(state.params, state.batch_stats,
                    np.ascontiguousarray(x)[None, ..., None])
        p = np.asarray(jax.nn.sigmoid(logits))[0, ..., :len(total)]
        total += np.moveaxis(np.flip(p, axes) if axes else p, -1, 0)
    mean = (total / (len(fns) * len(flips))).astype(np.float32)
    return (mean[0], mean[1]) if brain else mean[0]

  return probability


def to_native(grid_prob: np.ndarray, native_shape,
              threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """``(native probability, native mask)``: the grid probability resized back."""
  native = np.clip(subjects.resize_back(grid_prob, tuple(native_shape)), 0.0, 1.0)
  return native.astype(np.float32), native >= threshold


def brain_mask(brain_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """The brain: ``brain_prob >= threshold``, its largest 26-connected component,
  holes filled in every axial slice (axis 2), then in 3-D."""
  mask = brain_prob >= threshold
  cc, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
  if n == 0:
    return mask
  mask = cc == np.argmax(np.bincount(cc.ravel())[1:]) + 1
  return subjects.fill_holes(subjects.fill_holes(mask, in_plane=True))


def native_probability(output, native_shape, pconfig
                       ) -> tuple[np.ndarray, np.ndarray | None]:
  """A probability function's output mapped onto the scan's own grid.

  Returns ``(lesion probability, brain mask or None)``. With a brain
  probability, the brain mask is :func:`brain_mask` of it resized back
  (``pconfig.brain_threshold``), and with ``pconfig.mask_to_brain`` the lesion
  probability is 0 outside it, so neither the threshold nor the refiner finds
  a lesion there. The one place predict, evaluate and the refiner's fit do this.
  """
  lesion, brain = split_probability(output)
  if brain is None:
    return to_native(lesion, native_shape, 0.5)[0], None
  mask = brain_mask(to_native(brain, native_shape, 0.5)[0], pconfig.brain_threshold)
  return native_lesion(lesion, native_shape, mask, pconfig), mask


def native_lesion(lesion: np.ndarray, native_shape, brain: np.ndarray,
                  pconfig) -> np.ndarray:
  """The grid lesion probability resized back, 0 outside the native ``brain``
  with ``pconfig.mask_to_brain``."""
  prob, _ = to_native(lesion, native_shape, 0.5)
  if pconfig.mask_to_brain:
    prob = np.where(brain, prob, np.float32(0.0))
  return prob


def model_input(image, config, path='image') -> np.ndarray:
  """What the network sees first: the whole scan preprocessed onto ``data.grid``
  (its own slices with ``data.grid_max_depth``: ``subjects.scan_grid``),
  z-scored in its head mask."""
  subjects.check_resamplable(image, path)   # a 3-D volume, before its depth is read
  grid = subjects.scan_grid(image.shape, config.data.grid, subjects.depth_rule(config))
  return subjects.preprocess(image, grid, path)


def load_members(config, workdir) -> list:
  """The ensemble: ``workdir`` plus ``config.predict.ensemble`` (latest checkpoints,
  their weights only: ``checkpoints.restore_weights``)."""
  members = []
  for d in [workdir, *config.predict.ensemble]:
    try:
      members.append(checkpoints.restore_weights(config, d))
    except ValueError as e:  # orbax: a stored array of another shape
      if 'stored shape' not in str(e):
        raise
      raise ValueError(
          f'{Path(d) / "checkpoints"}: the checkpoint does not fit this config\'s '
          f'model.* ({_mismatch_hint(config, d)}): {str(e).split(". ")[0]}') from e
  return members


def _mismatch_hint(config, workdir) -> str:
  """What to pass for a checkpoint that does not fit ``config``: the other
  ``model.brain_output`` when the checkpoint fits that, else the network the
  run was trained with (a run made before WORKDIR/config.json was written
  takes its config by hand; the seed's filters were the default then)."""
  other = config.copy_and_resolve_references()
  other.model.brain_output = not config.model.get('brain_output', False)
  try:
    checkpoints.restore_weights(other, workdir)
  except ValueError as e:
    if 'stored shape' not in str(e):
      raise
    return ('trained with another network: pass the config it was trained with, '
            'e.g. --config=configs/seed_width.py for the seed\'s filters, the default '
            'of runs made before WORKDIR/config.json was written')
  return f'trained with model.brain_output={other.model.brain_output}? pass that'


def load_refiner(config, workdir, step: int):
  """The native refiner fitted on U-Net ``step`` when ``config.refine.enabled``."""
  if not config.refine.enabled:
    return None
  refiner = refine.load(workdir, step)
  if refiner is None:
    logging.warning('%s: no refiner for step %d; the U-Net\'s mask alone',
                    refine.path_for(workdir, step), step)
  return refiner




def native_flair_missing(examples, consequence: str) -> bool:
  """Whether some of ``examples`` (prepared subjects) have no native FLAIR file
  (a TFDS dataset keeps none): the refiner can be neither fitted nor applied.
  Warns, ending with ``consequence``."""
  if all(p.get('source') for p in examples):
    return False
  logging.warning('refine: the dataset (data.tfds) keeps no native FLAIR; %s',
                  consequence)
  return True


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """A loaded model: everything :func:`segment` needs besides the scan.

  ``probability_fn``: network input -> lesion probability, or ``(lesion,
  brain)`` (:func:`make_probability_fn`); ``threshold``: the U-Net's;
  ``refiner``: a ``wmh_jax.refine`` refiner or None, applied to the voxels with
  U-Net probability >= ``candidate`` (the refiner's own, else the config's).
  """
  probability_fn: Callable
  config: Any
  threshold: float
  refiner: dict | None = None
  candidate: float = 0.0
  members: tuple = ()
  step: int | None = None


def tta_axes(config) -> tuple:
  """The grid axes predict flips for test-time augmentation (``predict.tta``):
  ``predict.tta_axes``, or none."""
  pc = config.predict
  return tuple(pc.tta_axes) if pc.tta else ()


def unet_segmenter(config, model, state) -> Segmenter:
  """The U-Net of ``(model, state)`` alone, as the refiner's fit sees it: flip
  TTA as ``predict.tta``, ``predict.threshold``, no refiner."""
  return Segmenter(make_probability_fn([(model, state)], tta_axes(config)),
                   config, config.predict.threshold)


def load(config, workdir) -> Segmenter:
  """The ensemble of ``workdir`` (with flip TTA when ``predict.tta``), its
  refiner and ``predict.threshold``."""
  pc = config.predict
  subjects.input_norm(config.data)   # a bad value fails before the model loads
  members = load_members(config, workdir)
  step = int(members[0][1].step)
  refiner = load_refiner(config, workdir, step)
  return Segmenter(
      probability_fn=make_probability_fn(members, tta_axes(config)),
      config=config,
      threshold=pc.threshold,
      refiner=refiner,
      candidate=refine.candidate_of(refiner, config.refine.candidate),
      members=tuple(members), step=step)


@dataclasses.dataclass(frozen=True)
class ScanInput:
  """One scan as the pipeline takes it.

  ``volume``: what the network sees first (:func:`model_input`: on
  the scan's grid, z-scored in the head mask; a second pass, ``segment``, reads
  the native FLAIR);
  ``flair``: the native FLAIR file (the refiner's input), None for a TFDS example.
  """
  volume: np.ndarray
  native_shape: tuple
  spacing: tuple
  flair: Path | str | None = None
  affine: np.ndarray | None = None


def read_scan(path, config) -> ScanInput:
  """Reads and preprocesses the FLAIR at ``path`` (bad input: one line naming it)."""
  image, affine = nifti_io.load_image(path)
  return ScanInput(model_input(image, config, path), tuple(image.shape),
                   tuple(subjects.voxel_spacing(affine)), path, affine)


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """One scan's result, every array on its native grid (canonical RAS).

  ``output``: the network's on its input (with ``data.input_norm='brain'``, the
  lesion of its second pass and the brain of its first); ``unet_probability``:
  that resized back (0 outside the brain with ``predict.mask_to_brain``); ``probability``
  and ``mask``: the final ones (refined when ``refined``); ``brain``: the brain
  mask or None; ``image``: the native FLAIR when read; ``flair_z``: it z-scored
  in the brain (the refiner's input, and the second pass's) when refining,
  stopped before, or with ``data.input_norm='brain'``.
  """
  output: Any
  unet_probability: np.ndarray
  probability: np.ndarray
  mask: np.ndarray
  brain: np.ndarray | None
  image: np.ndarray | None = None
  flair_z: np.ndarray | None = None
  refined: bool = False


def segment(segmenter: Segmenter, scan: ScanInput, read_image: bool = False,
            before_refine: bool = False) -> Segmentation:
  """Segments one scan: network -> native grid -> brain -> (with
  ``data.input_norm='brain'`` and the native FLAIR: the network again on the
  scan z-scored in that brain, for the lesion) -> refine -> threshold.

  Args:
    segmenter: the model (:func:`load`).
    scan: the preprocessed scan (:func:`read_scan`).
    read_image: also read the native FLAIR (``Segmentation.image``; to draw).
    before_refine: stop before refining, with the refiner's input
      (``flair_z``) read: what the refiner is fitted on, and what
      :func:`refine_segmentation` finishes.
  """
  fn, config = segmenter.probability_fn, segmenter.config
  out = fn(scan.volume)
  prob, brain = native_probability(out, scan.native_shape, config.predict)
  refiner = None if before_refine else segmenter.refiner
  two_pass = (brain is not None and scan.flair is not None
              and subjects.input_norm(config.data) == 'brain')
  need_z = scan.flair is not None and (refiner is not None or before_refine
                                       or two_pass)
  image = (nifti_io.load_image(scan.flair)[0]
           if scan.flair is not None and (read_image or need_z) else None)
  flair_z = subjects.zscore(image, scan.flair, brain) if need_z else None
  if two_pass:  # the lesion from the scan z-scored in the brain just found,
    # on the grid as training's image_brain (subjects.preprocess with the brain;
    # training's is rescored from its head image, equal to float32 rounding)
    second = fn(subjects.to_grid(flair_z, scan.volume.shape, scan.flair))
    out = (split_probability(second)[0], split_probability(out)[1])
    prob = native_lesion(out[0], scan.native_shape, brain, config.predict)
  unrefined = Segmentation(out, prob, prob, prob >= segmenter.threshold, brain,
                           image, flair_z)
  if refiner is None:
    return unrefined
  return refine_segmentation(segmenter, unrefined, scan.spacing)


def scans_at_once(config) -> int:
  """``predict.workers``: scans segmented at once (threads), at least 1."""
  return max(1, int(config.predict.get('workers', 1)))


def in_order(fn: Callable, items, workers: int = 1):
  """Yields ``(item, fn(item))`` for each of ``items`` in order, computed
  ``workers`` at a time on threads: none starts more than ``workers`` items
  ahead of the one the caller was last given.

  One scan at a time leaves a core idle whenever NumPy and SciPy work on one
  thread between the network's passes (resizing, the brain's components,
  reading the FLAIR, the refiner's features); two scans at once fill it.
  Each item's computation is its own, so the results are those of one at a
  time, and an error is raised at its item, after those before it.
  """
  items = iter(items)
  if workers <= 1:
    yield from ((x, fn(x)) for x in items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque((x, pool.submit(fn, x))
                                for x in itertools.islice(items, workers))
    try:
      while pending:
        x, future = pending.popleft()
        result = future.result()
        for y in itertools.islice(items, 1):   # the next starts before this is used
          pending.append((y, pool.submit(fn, y)))
        yield x, result
    finally:                                   # stopped early: start no more
      for _, future in pending:
        future.cancel()


def refine_segmentation(segmenter: Segmenter, seg: Segmentation,
                        spacing) -> Segmentation:
  """The last step of :func:`segment`: ``segmenter``'s refiner on a scan's
  segmentation stopped before it (``before_refine``), voxel size ``spacing``.
  One U-Net pass then serves any number of refiners (``bench/refiner_spread.py``).
  """
  refiner = segmenter.refiner
  if refiner is None:
    raise ValueError('refine_segmentation: the segmenter has no refiner')
  if seg.flair_z is None:
    raise ValueError('refine: a scan without its native FLAIR file cannot be refined')
  final = refine.refine(refiner, seg.unet_probability, seg.flair_z, spacing,
                        segmenter.candidate)
  mask = challenge_metrics.drop_small_lesions(final >= refiner['threshold'],
                                              spacing, refine.min_lesion_of(refiner),
                                              refine.min_area_of(refiner))
  return dataclasses.replace(seg, probability=final, mask=mask, refined=True)
