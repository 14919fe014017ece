"""Predict mode: segment any FLAIR and write the mask on the input's own grid.

  python launch.py --mode=predict --workdir=runs/default --input=scan.nii.gz \
      --output=out/ [--config.predict.tta=True] [--config.predict.overlays=True]

Each input goes through the training preprocessing (canonical RAS orientation,
then ``subjects.preprocess``: z-score inside the head mask, resize). With
``predict.method='resize'`` (the seed's way, the default) the network sees the
whole scan resized to ``config.data.grid``; with ``'sliding_window'`` the scan is
resampled to ``predict.spacing`` and the network slides over it in windows of
``predict.window`` (default: the training patch), the overlapping outputs blended
with Gaussian weights. The lesion probability (the mean over the ensemble members
and flip TTA) is resized back to the native grid and thresholded; with a refiner
fitted on the workdir's checkpoint (``wmh_jax.refine``, ``config.refine``) the
native voxels are decided again from that probability and the FLAIR around them.
A model with a brain output (``model.brain_output``) also gives the brain
probability, averaged alike; its native mask (``native_probability``) bounds the
lesions: no lesion outside the brain (``predict.mask_to_brain``).
``OUT/<name>_wmh.nii.gz`` (uint8 0/1) keeps the input's shape, axis order, affine
and header, as does ``<name>_brain.nii.gz``; ``<name>_prob.nii.gz``,
``<name>_overlay.png`` and ``<name>_activations.png`` are optional.
``OUT/volumes.csv`` has one row a scan (:data:`VOLUME_FIELDS`): lesion volume and
count, brain volume, and the challenge metrics where the scan has a ``wmh.nii.gz``.

Outputs never replace an input, and a rerun does not read them as scans: the
NIfTI outputs carry ``nifti_io.PREDICT_MARK`` in their header description, and
an input with that mark is skipped with a warning; an input without it but named
like another input's output (``NAME_wmh``, ``NAME_brain``, ``NAME_prob``) is
refused, as is an output path that is an input file. Every input is read and
checked, and the model loaded, before anything is created (the output folder
included); each file is written atomically (``atomic_write``). ``--overwrite``
replaces a scan's outputs and removes those of its outputs this run does not
write (a probability map or overlay from an earlier run).
"""

import csv
import dataclasses
import functools
import itertools
import os
from pathlib import Path

from absl import logging
import jax
import numpy as np
from scipy import ndimage

from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import figures
from wmh_jax import metrics
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import steps
from wmh_jax import subjects
from wmh_jax import tables

# What predict writes for scan NAME: NAME + suffix, in the output folder.
OUTPUT_SUFFIXES = {'mask': '_wmh.nii.gz', 'brain': '_brain.nii.gz',
                   'prob': '_prob.nii.gz', 'overlay': '_overlay.png',
                   'activations': '_activations.png'}
# The outputs a scan could be mistaken for (NIfTI, so read as scans).
_NIFTI_OUTPUTS = ('mask', 'brain', 'prob')
_DESCRIP = {'mask': 'lesion mask', 'brain': 'brain mask', 'prob': 'lesion probability'}
VOLUMES = 'volumes.csv'
VOLUME_FIELDS = ('id', 'file', 'lesion_volume_ml', 'lesion_count', 'brain_volume_ml',
                 'brain_dice', *challenge_metrics.METRICS)


class InputError(ValueError):
  """An input predict must not read or must not overwrite (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Scan:
  name: str
  flair: Path
  wmh: Path | None = None
  brain: Path | None = None


def _stem(path: Path) -> str:
  name = path.name
  for ext in ('.nii.gz', '.nii'):
    if name.endswith(ext):
      return name[:-len(ext)]
  return path.stem


def collect_inputs(paths) -> list[Scan]:
  """Scans named by ``paths``: NIfTI files, folders of them, or challenge layouts.

  A folder holding ``**/pre/FLAIR.nii.gz`` is read as the challenge layout (its
  ``wmh.nii.gz`` and ``brain.nii.gz``, when present, are scored and drawn on the
  overlays); scans are then named
  by subject id (``SITE_ID`` when ids repeat across sites).
  """
  scans = []
  for p in map(Path, paths):
    if p.is_file():
      scans.append(Scan(_stem(p), p))
    elif p.is_dir() and any(p.glob('**/pre/FLAIR.nii.gz')):
      found = subjects.find_subjects(p, missing_mask='keep')
      ids = [s.id for s in found]
      for s in found:
        name = s.id if ids.count(s.id) == 1 else f'{s.site.replace("/", "_")}_{s.id}'
        scans.append(Scan(name, s.flair, s.wmh, s.brain))
    elif p.is_dir():
      files = sorted(f for f in p.iterdir() if f.name.endswith(('.nii', '.nii.gz')))
      if not files:
        raise FileNotFoundError(f'{p}: no NIfTI files in this folder')
      scans += [Scan(_stem(f), f) for f in files]
    else:
      raise FileNotFoundError(f'{p}: no such file or folder')
  if not scans:
    raise FileNotFoundError('predict: no input (pass --input=PATH)')
  names = [s.name for s in scans]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise FileExistsError(f'two inputs would write the same output: {dup[0]}_wmh.nii.gz')
  return scans


def _mark(kind: str) -> str:
  """The header description of a NIfTI output (how a rerun recognises it)."""
  return f'{nifti_io.PREDICT_MARK}: {_DESCRIP[kind]}'


def _output_of(name: str, names) -> str | None:
  """The name among ``names`` whose NIfTI output ``name`` would be (``NAME_wmh``,
  ``NAME_brain``, ``NAME_prob``), or None."""
  for kind in _NIFTI_OUTPUTS:
    tail = OUTPUT_SUFFIXES[kind].removesuffix('.nii.gz')
    if name.endswith(tail) and name[:-len(tail)] in names:
      return name[:-len(tail)]
  return None


def skip_own_outputs(scans: list[Scan]) -> list[Scan]:
  """``scans`` less this tool's own outputs; refuses look-alikes.

  A file whose header carries ``nifti_io.PREDICT_MARK`` was written by predict
  (a rerun into the input folder): skipped with a warning. A file without the
  mark named like the output of another input of the run (``NAME_wmh``,
  ``NAME_brain``, ``NAME_prob`` of an input ``NAME``) may be a scan that an
  output would replace, or an older version's output: refused (``InputError``,
  one line naming them).
  """
  own = [s for s in scans if nifti_io.written_by_predict(s.flair)]
  if own:
    logging.warning('predict: skipping %d earlier output(s) of predict: %s',
                    len(own), ', '.join(str(s.flair) for s in own))
  scans = [s for s in scans if s not in own]
  by_name = {s.name: s for s in scans}
  alike = [(s, by_name[_output_of(s.name, by_name)]) for s in scans
           if _output_of(s.name, by_name)]
  if alike:
    (s, other), more = alike[0], [str(a.flair) for a, _ in alike[1:]]
    raise InputError(
        f'{s.flair}: named like predict\'s output for the input {other.flair}'
        + (f' (also {", ".join(more)})' if more else '')
        + '; rename it, or move it out of the input')
  if not scans:
    raise FileNotFoundError(f'{own[0].flair}: an output of predict, not a scan (so '
                            'is every input)')
  return scans


def output_paths(out_dir: Path, name: str, pconfig=None, brain: bool = False
                 ) -> dict[str, Path]:
  """The files predict writes for scan ``name``; ``brain``: the model has a brain
  output. Without ``pconfig`` every file it could write."""
  every = {k: out_dir / f'{name}{suffix}' for k, suffix in OUTPUT_SUFFIXES.items()}
  if pconfig is None:
    return every
  wanted = {'mask': True, 'brain': brain and pconfig.save_brain,
            'prob': pconfig.save_probabilities, 'overlay': pconfig.overlays,
            'activations': pconfig.activations}
  return {k: p for k, p in every.items() if wanted[k]}


def check_inputs_kept(scans: list[Scan], out_dir: Path) -> None:
  """Refuses a run where any output path (of any kind) is an input file."""
  inputs = [f for s in scans for f in (s.flair, s.wmh, s.brain) if f is not None]
  for s in scans:
    for target in output_paths(out_dir, s.name).values():
      if not target.exists():
        continue
      hit = [f for f in inputs if os.path.samefile(target, f)]
      if hit:
        raise InputError(f'{hit[0]}: the output {target} would replace this input '
                         '(pass another --output)')


def check_outputs_free(targets: list[Path], overwrite: bool) -> None:
  existing = [t for t in targets if t.exists() or t.is_symlink()]
  if existing and not overwrite:
    more = f'; {len(existing)} outputs exist' if len(existing) > 1 else ''
    raise FileExistsError(f'{existing[0]}: already exists (pass --overwrite to '
                          f'replace{more})')


def check_writable(out_dir: Path) -> None:
  """Refuses an output folder that cannot be created or written, creating nothing:
  its nearest existing folder must be a writable folder."""
  probe = out_dir.absolute()
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  reason = None
  if not probe.is_dir():
    reason = f'{probe} is not a folder'
  elif not os.access(probe, os.W_OK | os.X_OK):
    reason = f'no permission to write in {probe}'
  if reason:
    raise PermissionError(f'{out_dir}: output folder is not writable ({reason})')


def make_output_folder(out_dir: Path) -> None:
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PermissionError(f'{out_dir}: output folder is not writable '
                          f'({e.strerror or e})') from e


def remove_stale(out_dir: Path, name: str, written: dict[str, Path]) -> list[Path]:
  """Removes the outputs of scan ``name`` that this run did not write (``--overwrite``:
  nothing of an earlier run is left beside the new outputs as if current)."""
  stale = [p for k, p in output_paths(out_dir, name).items()
           if k not in written and (p.exists() or p.is_symlink())]
  for p in stale:
    p.unlink()
  return stale


def earlier_volumes(path: Path, names, overwrite: bool) -> list[dict]:
  """The rows of an existing ``volumes.csv`` for scans other than ``names`` (a
  table kept across runs into one folder); refuses a file that is not one."""
  if not (path.exists() or path.is_symlink()):
    return []
  try:
    with open(path, newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
      fields = rows[0].keys() if rows else ()
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    rows, fields = None, str(e)
  if rows is None or (rows and 'id' not in fields):
    if overwrite:
      logging.warning('%s: not a table of predict; replaced', path)
      return []
    raise InputError(f'{path}: not a table of predict (no id column); move it or '
                     'pass --overwrite to replace it')
  return [r for r in rows if r['id'] not in set(names)]


def volume_row(scan: Scan, r: dict) -> dict:
  """A ``volumes.csv`` row from a result of :func:`predict`."""
  row = {'id': scan.name, 'file': str(scan.flair), 'lesion_volume_ml': r['volume_ml'],
         'lesion_count': r['lesions']}
  for k in ('brain_volume_ml', 'brain_dice', *challenge_metrics.METRICS):
    if k in r:
      row[k] = r[k]
  return row


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
  fns = [(jax.jit(functools.partial(steps.predict_logits, model=m)), s)
         for m, s in members]
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
  for z in range(mask.shape[2]):
    mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
  return ndimage.binary_fill_holes(mask)


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
  prob, _ = to_native(lesion, native_shape, 0.5)
  if brain is None:
    return prob, None
  mask = brain_mask(to_native(brain, native_shape, 0.5)[0], pconfig.brain_threshold)
  if pconfig.mask_to_brain:
    prob = np.where(mask, prob, np.float32(0.0))
  return prob, mask


def window_starts(n: int, window: int, overlap: float) -> list[int]:
  """Window origins along one axis: steps of ``window * (1 - overlap)``, ends flush."""
  if n <= window:
    return [0]
  step = max(1, int(window * (1.0 - overlap)))
  starts = list(range(0, n - window + 1, step))
  return starts if starts[-1] == n - window else starts + [n - window]


def gaussian_weights(window, sigma_fraction: float = 0.125) -> np.ndarray:
  """A separable Gaussian (sigma = window / 8) peaking at the window centre."""
  axes = []
  for w in window:
    x = np.arange(w) - (w - 1) / 2
    axes.append(np.exp(-0.5 * (x / max(sigma_fraction * w, 1e-3)) ** 2))
  weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
  return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def to_spacing(image: np.ndarray, affine: np.ndarray, spacing,
               path='image') -> np.ndarray:
  """The training preprocessing at a fixed voxel ``spacing`` (mm) instead of a grid."""
  native = subjects.voxel_spacing(affine)
  shape = np.maximum(np.round(np.array(image.shape) * native / np.array(spacing)), 2)
  return subjects.preprocess(image, tuple(int(n) for n in shape), path)


def sliding_window(volume: np.ndarray, probability_fn, window,
                   overlap: float = 0.5):
  """Gaussian-weighted mean of ``probability_fn`` over overlapping windows (each
  part of a ``(lesion, brain)`` output blended alike)."""
  window = tuple(int(w) for w in window)
  full = tuple(max(n, w) for n, w in zip(volume.shape, window))
  padded = np.pad(volume, [(0, f - n) for f, n in zip(full, volume.shape)],
                  constant_values=float(volume.min()))
  weights = gaussian_weights(window)
  totals, pair = None, False
  norm = np.zeros(full, np.float64)
  for start in itertools.product(*[window_starts(f, w, overlap)
                                    for f, w in zip(full, window)]):
    region = tuple(slice(a, a + w) for a, w in zip(start, window))
    out = probability_fn(padded[region])
    pair = isinstance(out, tuple)
    parts = out if pair else (out,)
    if totals is None:
      totals = [np.zeros(full, np.float64) for _ in parts]
    for total, part in zip(totals, parts):
      total[region] += part * weights
    norm[region] += weights
  crop = tuple(slice(0, n) for n in volume.shape)
  blended = tuple((total / norm)[crop].astype(np.float32) for total in totals)
  return blended if pair else blended[0]


def model_input(image, affine, config, path='image') -> np.ndarray:
  """What the network sees: the config grid, or the volume at predict.spacing."""
  if config.predict.method == 'resize':
    return subjects.preprocess(image, tuple(config.data.grid), path)
  if config.predict.method == 'sliding_window':
    return to_spacing(image, affine, config.predict.spacing, path)
  raise ValueError(f'predict.method must be resize or sliding_window, got '
                   f'{config.predict.method!r}')


def network_window(config) -> tuple[int, ...]:
  """The shape the network is applied to: the grid, or the sliding window."""
  if config.predict.method == 'resize':
    return tuple(config.data.grid)
  return tuple(config.predict.window or config.train.patch_size or config.data.grid)


def center_crop(volume: np.ndarray, window) -> np.ndarray:
  """The ``window``-shaped middle of ``volume`` (padded with its minimum if smaller)."""
  padded = np.pad(volume, [(0, max(0, w - n)) for w, n in zip(window, volume.shape)],
                  constant_values=float(volume.min()))
  corner = [(n - w) // 2 for n, w in zip(padded.shape, window)]
  return padded[tuple(slice(c, c + w) for c, w in zip(corner, window))]


def probability_on_input(volume, probability_fn, config):
  """Lesion probability (or ``(lesion, brain)``) on the model-input volume (grid
  or fixed spacing)."""
  if config.predict.method == 'resize':
    return probability_fn(volume)
  return sliding_window(volume, probability_fn, network_window(config),
                        config.predict.overlap)


def load_members(config, workdir) -> list:
  """The ensemble: ``workdir`` plus ``config.predict.ensemble`` (latest checkpoints)."""
  members = []
  for d in [workdir, *config.predict.ensemble]:
    try:
      members.append(checkpoints.restore_latest(config, d))
    except ValueError as e:  # orbax: a stored array of another shape
      if 'stored shape' not in str(e):
        raise
      raise ValueError(
          f'{Path(d) / "checkpoints"}: the checkpoint does not fit this config\'s '
          f'model.* (trained with model.brain_output='
          f'{not config.model.get("brain_output", False)}? pass that): '
          f'{str(e).split(". ")[0]}') from e
  return members


def load_refiner(config, workdir, step: int):
  """The native refiner fitted on U-Net ``step`` when ``config.refine.enabled``
  and the scans are predicted as in training (``predict.method='resize'``)."""
  if not config.refine.enabled:
    return None
  refiner = refine.load(workdir, step)
  if refiner is None:
    logging.warning('%s: no refiner for step %d; the U-Net\'s mask alone',
                    refine.path_for(workdir, step), step)
  elif config.predict.method != 'resize':
    logging.warning('refine: fitted on predict.method=resize; not applied to %s',
                    config.predict.method)
    return None
  return refiner


def activation_collage(path, members, grid_image, title):
  """The post-ReLU feature maps of every conv layer of the first member."""
  model, state = members[0]
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  _, inter = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                              mutable=['intermediates']))(
                                                  variables, grid_image[None, ..., None])
  blocks = inter['intermediates']
  names = sorted(blocks, key=lambda n: int(n.rsplit('_', 1)[1]))
  n_enc = len(model.encoder_filters) + 1  # encoder levels and the bottleneck
  rows = []
  for part, block_names in (('encoder', names[:n_enc]), ('decoder', names[n_enc:])):
    row = []
    for b in block_names:
      for relu in sorted(blocks[b]):
        a = np.asarray(blocks[b][relu][0])[0]  # (Z, X, Y, C)
        row.append((f'{b}/{relu} ({a.shape[-1]} ch)', a))
    rows.append((part, row))
  figures.activation_collage(path, rows, title)


def predict(config, workdir, inputs, output, overwrite: bool = False,
            probability_fn=None) -> list[dict]:
  """Segments every input; returns one ``{name, mask, volume_ml, lesions}`` a scan
  (with a brain output also ``brain``, ``brain_volume_ml``, and ``brain_dice``
  when the scan has a ``brain.nii.gz``) and writes them to ``OUT/volumes.csv``.

  ``probability_fn`` (model input -> probability, or ``(lesion, brain)``)
  replaces the checkpoints of ``workdir`` and ``config.predict.ensemble`` when
  given. Inputs that are predict's own outputs are skipped, look-alikes refused
  (:func:`skip_own_outputs`); nothing is created before every input is read
  and the model is loaded.
  """
  if not output:
    raise FileNotFoundError('predict: pass --output=DIR for the masks')
  pc = config.predict
  scans = skip_own_outputs(collect_inputs(inputs))
  out_dir = Path(output)
  brain_out = bool(config.model.get('brain_output', False))
  check_inputs_kept(scans, out_dir)
  targets = {s.name: output_paths(out_dir, s.name, pc, brain_out) for s in scans}
  check_outputs_free([p for s in scans for p in output_paths(out_dir, s.name).values()],
                     overwrite)
  table = out_dir / VOLUMES
  rows = earlier_volumes(table, targets, overwrite)
  # Read and check every input before the first file is written; keep only the
  # preprocessed volumes (the native images are read again when drawn).
  prepared = {}
  for s in scans:
    image, affine = nifti_io.load_image(s.flair)
    prepared[s.name] = (model_input(image, affine, config, s.flair), image.shape, affine)
    if s.wmh is not None:
      nifti_io.load_labels(s.wmh, affine, image.shape)
    if s.brain is not None:
      nifti_io.load_brain(s.brain, affine, image.shape)
  check_writable(out_dir)
  refiner = None
  if probability_fn is None:
    members = load_members(config, workdir)
    probability_fn = make_probability_fn(members, pc.tta_axes if pc.tta else ())
    refiner = load_refiner(config, workdir, int(members[0][1].step))
  elif pc.activations:
    raise ValueError('predict.activations needs a trained model (workdir)')
  make_output_folder(out_dir)
  results = []
  for k, s in enumerate(scans):
    volume, shape, affine = prepared.pop(s.name)
    prob, brain = native_probability(
        probability_on_input(volume, probability_fn, config), shape, pc)
    mask = prob >= pc.threshold
    paths = targets[s.name]
    native = (nifti_io.load_image(s.flair)[0]
              if refiner is not None or 'overlay' in paths else None)
    if refiner is not None:
      prob = refine.refine(refiner, prob, subjects.zscore(native, s.flair, brain),
                           subjects.voxel_spacing(affine), config.refine.candidate)
      mask = prob >= refiner['threshold']
    nifti_io.save_like(paths['mask'], mask.astype(np.uint8), s.flair,
                       descrip=_mark('mask'))
    if 'prob' in paths:
      nifti_io.save_like(paths['prob'], prob, s.flair, dtype=np.float32,
                         descrip=_mark('prob'))
    if brain is None:
      paths.pop('brain', None)
    else:
      if 'brain' in paths:
        nifti_io.save_like(paths['brain'], brain.astype(np.uint8), s.flair,
                           descrip=_mark('brain'))
    truth = None
    if s.wmh is not None:
      truth = nifti_io.load_labels(s.wmh, affine, shape)
    true_brain = None
    if s.brain is not None and brain is not None:
      true_brain = nifti_io.load_brain(s.brain, affine, shape) == 1
    if 'overlay' in paths:
      figures.overlay(paths['overlay'], native, mask, truth, title=s.name,
                      brain=brain)
    if 'activations' in paths:
      activation_collage(paths['activations'], members,
                         center_crop(volume, network_window(config)), s.name)
    if overwrite:
      remove_stale(out_dir, s.name, paths)
    r = {'name': s.name, 'mask': str(paths['mask']),
         'volume_ml': metrics.volume_ml(mask, affine),
         'lesions': challenge_metrics.lesions(mask)[1]}
    if brain is not None:
      if 'brain' in paths:
        r['brain'] = str(paths['brain'])
      r['brain_volume_ml'] = metrics.volume_ml(brain, affine)
    if true_brain is not None:
      r['brain_dice'] = challenge_metrics.dice(true_brain, brain)
    if truth is not None:  # on the file's own axes, as --mode=score reads them
      on_file = nifti_io.file_affine(s.flair)
      r.update(challenge_metrics.challenge_metrics(
          nifti_io.from_canonical(truth, on_file), nifti_io.from_canonical(mask, on_file),
          on_file))
    results.append(r)
    rows.append(volume_row(s, r))
    tables.write_csv(table, rows, VOLUME_FIELDS)  # after each scan: a table of
    # the masks written so far, if the run stops
    line = (f'predict {k + 1}/{len(scans)} {s.name}: lesion volume '
            f'{r["volume_ml"]:.2f} mL, {r["lesions"]} lesions'
            + (f', Dice {r["dice"]:.3f}' if truth is not None else '')
            + (f'; brain volume {r["brain_volume_ml"]:.0f} mL' if brain is not None
               else '')
            + (f', brain Dice {r["brain_dice"]:.3f}' if true_brain is not None else '')
            + f' -> {paths["mask"]}')
    logging.info(line)
    print(line, flush=True)
  return results
