"""Evaluate mode: segment every validation subject at native resolution and score."""

import dataclasses
import json
from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import atomic_write
from wmh_jax import challenge_metrics
from wmh_jax import data
from wmh_jax import figures
from wmh_jax import inference
from wmh_jax import metrics
from wmh_jax import nifti_io
from wmh_jax import subjects
from wmh_jax import tables

FIELDS = ('subject', *challenge_metrics.METRICS, 'dice_unet', 'dice_grid',
          'dice_grid_oracle', *challenge_metrics.VOLUMES)
BRAIN_FIELDS = ('brain_dice',)  # added when the model and the subjects have brains


ORACLE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


def grid_oracle_dice(labels: np.ndarray, fraction: np.ndarray) -> float:
  """An oracle's native Dice through the grid: ``fraction``, the true lesion
  fraction of each grid voxel (``subjects.lesion_fraction``, a blurred copy of
  the truth), mapped back onto ``labels``' grid like a prediction and thresholded
  at whichever of ``ORACLE_THRESHOLDS`` scores best against this subject's own
  truth.

  A rough estimate of what working on the grid costs at native resolution (thin
  rims and small lesions fall between grid voxels). It is NOT an upper bound:
  the fraction is anti-aliased (blurred), and only 4 thresholds are tried, so a
  model whose grid output is sharper than the blurred fraction can beat it (0.808
  against 0.783 on one synthetic subject); and it peeks at the truth to pick the
  threshold. NaN when there is no lesion.
  """
  native, _ = inference.to_native(fraction, labels.shape, 0.5)
  return max((challenge_metrics.dice(*challenge_metrics.masked_pair(labels, native >= t))
              for t in ORACLE_THRESHOLDS), default=float('nan'))


def file_axes(p: dict, *canonical: np.ndarray) -> tuple:
  """``(*arrays, affine)``: a prepared subject's canonical (RAS) arrays put back
  on its FLAIR file's own axes, and that file's affine, as ``score`` reads the
  saved masks. A TFDS example (no ``source`` file) keeps its canonical arrays
  and affine, with which its masks are saved."""
  if not p.get('source'):
    return (*canonical, np.asarray(p['affine'], np.float64))
  return nifti_io.on_file_axes(p['source'], *canonical)


def case_row(p: dict, mask: np.ndarray) -> dict:
  """The subject's key, the challenge's five metrics and the volumes of a
  canonical ``mask`` against its native labels, computed on the file's own axes
  by ``challenge_metrics.case_metrics`` (the function ``score`` uses)."""
  return {'subject': p['key'], **challenge_metrics.case_metrics(
      *file_axes(p, p['native_labels'], mask))}


EXTRA_MEANS = ('dice_unet', 'dice_grid', 'dice_grid_oracle', 'brain_dice')


def summarize(rows: list[dict], preds, truths, step: int, refined: bool) -> dict:
  """``summary.json``: the challenge metrics' means (``challenge_metrics.summarize``:
  each with ``{metric}_n`` and ``{metric}_left_out``), and ``{name}_mean`` with
  ``{name}_n`` for each of ``EXTRA_MEANS`` the rows hold (``brain_dice`` only
  where a subject has a brain mask); NaNs (undefined cases) left out."""
  means = challenge_metrics.summarize(rows)
  summary = {
      'step': step,
      'refined': refined,
      'subjects': len(rows),
      **means,
      'dice_mean': means['dice'],
      'dice_std': float(np.nanstd([r['dice'] for r in rows])),
      'dice_pooled': metrics.pooled_dice(preds, truths),
  }
  for name in EXTRA_MEANS:
    if name == 'brain_dice' and not any(name in r for r in rows):
      continue
    mean, n, left_out = challenge_metrics.mean_and_count(rows, name)
    summary.update({f'{name}_mean': mean, f'{name}_n': n,
                    f'{name}_left_out': left_out})
  return summary


def summary_line(summary: dict) -> str:
  """The printed summary; a mean over fewer than all subjects says so
  (``HD95 18.10 mm (n=4 of 5; 1 empty prediction)``)."""
  total = summary['subjects']
  def extra(name):
    return f'{summary[f"{name}_mean"]:.3f}' + challenge_metrics.count_note(
        summary[f'{name}_n'], total, summary[f'{name}_left_out'])
  return (f'{challenge_metrics.summary_line(summary, total)}'
          f'  (Dice sd {summary["dice_std"]:.3f}, pooled {summary["dice_pooled"]:.3f};'
          f' U-Net alone {extra("dice_unet")}, on the grid {extra("dice_grid")}; '
          f'grid oracle (an estimate, not a bound) {extra("dice_grid_oracle")}'
          + (f'; brain Dice {extra("brain_dice")}' if 'brain_dice_n' in summary else '')
          + ')')


# The split evaluated -> (its folder in WORKDIR, its label). [issue 16: splits]
SPLITS = {'val': ('eval', 'development (validation)'), 'test': ('eval_test', 'test')}


def evaluated_step(workdir, split: str = 'val') -> int | None:
  """The checkpoint step that ``WORKDIR/eval`` (``eval_test``) holds the results of."""
  path = Path(workdir) / SPLITS[split][0] / 'summary.json'
  if not path.exists() or not (path.parent / 'metrics.csv').exists():
    return None
  return json.loads(path.read_text()).get('step')


def evaluate(config, workdir, overwrite: bool = False, split: str = 'val') -> dict:
  """Restores the latest checkpoint and scores the validation subjects.

  The mask is the refiner's (``wmh_jax.refine``) when ``config.refine.enabled``
  and one was fitted on this checkpoint, else the U-Net's probability resized
  back and thresholded at ``config.predict.threshold``; with a brain output,
  lesions outside the predicted brain are dropped first
  (``inference.native_probability``). Writes ``WORKDIR/eval/metrics.csv`` (one row
  a subject: the challenge's five metrics at native resolution on the file's own
  axes (:func:`case_row`, as ``--mode=score`` on ``eval/pred`` gives them), the
  U-Net's native Dice without refinement, Dice on the grid, the grid oracle's
  Dice (:func:`grid_oracle_dice`, an estimate, not a bound), volumes, and
  ``brain_dice`` for subjects with a ``brain.nii.gz``), ``summary.json`` (each
  mean with ``*_n``, the number of subjects it holds),
  native-resolution masks ``WORKDIR/eval/pred/SITE_ID_wmh.nii.gz`` (and
  ``SITE_ID_brain.nii.gz``) on each input's own grid, and overlay PNGs for the
  first ``config.evaluate.num_images`` subjects. Refuses to replace an earlier evaluation unless ``overwrite``.
  Returns the summary. ``split='test'``: the test subjects, into
  ``WORKDIR/eval_test`` instead.
  """
  workdir = Path(workdir)
  out_dir = workdir / SPLITS[split][0]
  if (out_dir / 'metrics.csv').exists() and not overwrite:
    raise FileExistsError(f'{out_dir / "metrics.csv"}: already exists (pass '
                          '--overwrite to evaluate again)')
  val = data.load_split(config, workdir, split)  # bad data fails first
  segmenter = inference.load(config, workdir)
  threshold = segmenter.threshold  # predict.threshold: the U-Net's, unrefined
  step = segmenter.step
  if segmenter.refiner is not None and inference.native_flair_missing(
      val, 'scoring the U-Net alone'):
    segmenter = dataclasses.replace(segmenter, refiner=None)
  refiner = segmenter.refiner
  rows, preds, truths = [], [], []

  def segmented(kp):
    k, p = kp
    return inference.segment(segmenter, inference.ScanInput(
        p['image'], p['native_shape'], p['spacing'], p.get('source') or None),
                             read_image=k < config.evaluate.num_images)

  for (k, p), seg in inference.in_order(segmented, enumerate(val),
                                        inference.scans_at_once(config)):
    source = p.get('source', '')
    draw = k < config.evaluate.num_images
    grid_prob, _ = inference.native_probability(seg.output, p['labels'].shape,
                                                config.predict)
    unet_mask = seg.unet_probability >= threshold
    labels = p['native_labels']
    mask, brain, native = seg.mask, seg.brain, seg.image
    rows.append({
        **case_row(p, mask),
        'dice_unet': challenge_metrics.dice(
            *challenge_metrics.masked_pair(labels, unet_mask)),
        'dice_grid': metrics.dice(grid_prob >= threshold, p['labels']),
        'dice_grid_oracle': grid_oracle_dice(labels, p['lesion_fraction']),
    })
    if brain is not None and 'native_brain' in p:
      rows[-1]['brain_dice'] = challenge_metrics.dice(p['native_brain'] == 1, brain)
    name = p['key'].replace('/', '_')
    written = {f'{name}_wmh.nii.gz': mask}
    if brain is not None:
      written[f'{name}_brain.nii.gz'] = brain
    for filename, volume in written.items():
      if source:   # the input's own header
        nifti_io.save_like(out_dir / 'pred' / filename, volume.astype(np.uint8), source)
      else:        # a TFDS example: its affine
        nifti_io.save(out_dir / 'pred' / filename, volume.astype(np.uint8),
                      p['affine'], dtype=np.uint8)
    if draw:
      image = (native if native is not None else
               subjects.resize_back(p['image'], p['native_shape']))
      figures.overlay(out_dir / 'overlays' / f'{name}.png',
                      image, mask, labels,
                      title=f'{p["key"]} Dice {rows[-1]["dice"]:.3f}', brain=brain)
    preds.append(mask)
    truths.append(labels)
    logging.info('evaluate %d/%d %s Dice %.3f%s', k + 1, len(val), p['key'],
                 rows[-1]['dice'], f', brain Dice {rows[-1]["brain_dice"]:.3f}'
                 if 'brain_dice' in rows[-1] else '')
  with_brain = any('brain_dice' in r for r in rows)
  fields = FIELDS + BRAIN_FIELDS if with_brain else FIELDS
  tables.write_csv(out_dir / 'metrics.csv', rows, fields)
  summary = summarize(rows, preds, truths, step, refiner is not None)
  what = 'U-Net + native refinement' if refiner is not None else 'U-Net'
  line = (f'evaluate {SPLITS[split][1]} ({what}, native resolution): '
          f'{summary_line(summary)}  -> {out_dir / "metrics.csv"}')
  atomic_write.write(out_dir / 'summary.json', json.dumps(summary, indent=1) + '\n')
  logging.info(line)
  print(line, flush=True)
  return summary
