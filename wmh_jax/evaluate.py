"""Evaluate mode: segment every validation subject at native resolution and score."""

import json
import os
from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import challenge_metrics
from wmh_jax import data
from wmh_jax import figures
from wmh_jax import metrics
from wmh_jax import nifti_io
from wmh_jax import predict
from wmh_jax import refine
from wmh_jax import score
from wmh_jax import subjects
from wmh_jax import tables

FIELDS = ('subject', *challenge_metrics.METRICS, 'dice_unet', 'dice_grid',
          'dice_ceiling', 'true_volume_ml', 'pred_volume_ml')
BRAIN_FIELDS = ('brain_dice',)  # added when the model and the subjects have brains


CEILING_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


def grid_ceiling(labels: np.ndarray, fraction: np.ndarray) -> float:
  """Native Dice of an ideal model on the grid: ``fraction``, the true lesion
  fraction of each grid voxel (``subjects.lesion_fraction``, the best probability
  a model could give there), mapped back onto ``labels``' grid like a prediction
  and thresholded at the best of ``CEILING_THRESHOLDS``.

  It estimates what working on the grid costs at native resolution (thin rims
  and small lesions fall between grid voxels); the gap between it and a model's
  Dice is the model's. NaN when there is no lesion.
  """
  native, _ = predict.to_native(fraction, labels.shape, 0.5)
  return max((challenge_metrics.dice(*challenge_metrics.masked_pair(labels, native >= t))
              for t in CEILING_THRESHOLDS), default=float('nan'))


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
  back and thresholded at ``config.evaluate.threshold``; with a brain output,
  lesions outside the predicted brain are dropped first
  (``predict.native_probability``). Writes ``WORKDIR/eval/metrics.csv`` (one row
  a subject: the challenge's five metrics at native resolution, the U-Net's
  native Dice without refinement, Dice on the grid, the grid's ceiling, volumes,
  and ``brain_dice`` for subjects with a ``brain.nii.gz``), ``summary.json``,
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
  members = predict.load_members(config, workdir)
  pc = config.predict
  prob_fn = predict.make_probability_fn(members, pc.tta_axes if pc.tta else ())
  threshold = config.evaluate.threshold
  step = int(members[0][1].step)
  refiner = predict.load_refiner(config, workdir, step)
  if refiner is not None and any(not p.get('source') for p in val):
    logging.warning('refine: the dataset (data.tfds) keeps no native FLAIR; '
                    'scoring the U-Net alone')
    refiner = None
  rows, preds, truths = [], [], []
  for k, p in enumerate(val):
    out = prob_fn(p['image'])
    prob, brain = predict.native_probability(out, p['native_shape'], pc)
    grid_prob, _ = predict.native_probability(out, p['labels'].shape, pc)
    unet_mask = prob >= threshold
    labels = p['native_labels']
    mask = unet_mask
    source = p.get('source', '')
    draw = k < config.evaluate.num_images
    native = (nifti_io.load_image(source)[0]
              if source and (draw or refiner is not None) else None)
    if refiner is not None:
      mask = refine.refine(refiner, prob, subjects.zscore(native, source, brain),
                           p['spacing'], config.refine.candidate) >= refiner['threshold']
    rows.append({
        **score.case_row(p['key'], labels, mask, p['affine']),
        'dice_unet': challenge_metrics.dice(
            *challenge_metrics.masked_pair(labels, unet_mask)),
        'dice_grid': metrics.dice(grid_prob >= threshold, p['labels']),
        'dice_ceiling': grid_ceiling(labels, p['lesion_fraction']),
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
  means = challenge_metrics.summarize(rows)
  summary = {
      'step': step,
      'refined': refiner is not None,
      'subjects': len(rows),
      **means,
      'dice_mean': means['dice'],
      'dice_std': float(np.nanstd([r['dice'] for r in rows])),
      'dice_pooled': metrics.pooled_dice(preds, truths),
      'dice_unet_mean': float(np.nanmean([r['dice_unet'] for r in rows])),
      'dice_grid_mean': float(np.mean([r['dice_grid'] for r in rows])),
      'dice_ceiling_mean': float(np.nanmean([r['dice_ceiling'] for r in rows])),
  }
  if with_brain:
    summary['brain_dice_mean'] = float(np.nanmean([r.get('brain_dice', np.nan)
                                                   for r in rows]))
  what = 'U-Net + native refinement' if refiner is not None else 'U-Net'
  line = (f'evaluate {SPLITS[split][1]} ({what}, native resolution): '
          f'{score.summary_line(means, len(rows))}'
          f'  (Dice sd {summary["dice_std"]:.3f}, pooled {summary["dice_pooled"]:.3f};'
          f' U-Net alone {summary["dice_unet_mean"]:.3f}, on the grid '
          f'{summary["dice_grid_mean"]:.3f}; ideal model on the grid: '
          f'{summary["dice_ceiling_mean"]:.3f}'
          + (f'; brain Dice {summary["brain_dice_mean"]:.3f}' if with_brain else '')
          + f')  -> {out_dir / "metrics.csv"}')
  tmp = out_dir / '.summary.json.tmp'
  tmp.write_text(json.dumps(summary, indent=1) + '\n')
  os.replace(tmp, out_dir / 'summary.json')
  logging.info(line)
  print(line, flush=True)
  return summary
