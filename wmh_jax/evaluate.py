"""Evaluate mode: segment every validation subject at native resolution and score."""

import csv
import functools
import io
import os
from pathlib import Path

from absl import logging
import jax
import numpy as np

from wmh_jax import data
from wmh_jax import figures
from wmh_jax import metrics
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import subjects
from wmh_jax import train

FIELDS = ('subject', 'dice', 'dice_grid', 'true_volume_ml', 'pred_volume_ml')


def segment_prepared(predict_fn, state, prepared: dict, threshold: float):
  """``(grid probability, native canonical mask)`` for one prepared subject."""
  logits = predict_fn(state.params, state.batch_stats,
                      prepared['image'][None, ..., None])
  prob = np.asarray(jax.nn.sigmoid(logits))[0, ..., 0]
  native = subjects.resize_back(prob, tuple(prepared['native_shape']))
  return prob, native >= threshold


def evaluate(config, workdir) -> dict:
  """Restores the latest checkpoint and scores the validation subjects.

  Writes ``WORKDIR/eval/metrics.csv`` (one row a subject), native-resolution
  masks ``WORKDIR/eval/pred/SITE_ID_wmh.nii.gz`` on each input's own grid, and
  overlay PNGs for the first ``config.evaluate.num_images`` subjects. Returns the
  summary (mean Dice at native resolution and on the grid, pooled Dice).
  """
  workdir = Path(workdir)
  manager = train.checkpoint_manager(workdir, config, read_only=True)
  if manager.latest_step() is None:
    raise FileNotFoundError(f'{workdir / "checkpoints"}: no checkpoint to '
                            'evaluate (train first)')
  model = models.create_model(config.model)
  tx = train.create_optimizer(config.train)
  state = train.create_train_state(config, jax.random.PRNGKey(0), model, tx)
  state = train.restore_or_init(manager, state)
  manager.close()
  predict_fn = jax.jit(functools.partial(train.predict_logits, model=model))

  _, val = data.load_splits(config, workdir)
  found = {s.key: s for s in subjects.find_subjects(config.data.root,
                                                    config.data.missing_mask)}
  out_dir = workdir / 'eval'
  rows, preds, truths = [], [], []
  for k, p in enumerate(val):
    prob, mask = segment_prepared(predict_fn, state, p, config.evaluate.threshold)
    labels = p['native_labels']
    rows.append({
        'subject': p['key'],
        'dice': metrics.dice(mask, labels),
        'dice_grid': metrics.dice(prob >= config.evaluate.threshold, p['labels']),
        'true_volume_ml': metrics.volume_ml(labels == 1, p['affine']),
        'pred_volume_ml': metrics.volume_ml(mask & (labels != 2), p['affine']),
    })
    nifti_io.save_like(out_dir / 'pred' / f'{p["key"].replace("/", "_")}_wmh.nii.gz',
                       mask.astype(np.uint8), found[p['key']].flair)
    if k < config.evaluate.num_images:
      image, _ = nifti_io.load_image(found[p['key']].flair)
      figures.overlay(out_dir / 'overlays' / f'{p["key"].replace("/", "_")}.png',
                      image, mask, labels,
                      title=f'{p["key"]} Dice {rows[-1]["dice"]:.3f}')
    preds.append(mask)
    truths.append(labels)
    logging.info('evaluate %d/%d %s Dice %.3f', k + 1, len(val), p['key'],
                 rows[-1]['dice'])
  _write_csv(out_dir / 'metrics.csv', rows)
  summary = {
      'subjects': len(rows),
      'dice_mean': float(np.mean([r['dice'] for r in rows])),
      'dice_std': float(np.std([r['dice'] for r in rows])),
      'dice_pooled': metrics.pooled_dice(preds, truths),
      'dice_grid_mean': float(np.mean([r['dice_grid'] for r in rows])),
  }
  line = (f'evaluate: {summary["subjects"]} validation subjects  Dice (native) '
          f'{summary["dice_mean"]:.3f} ± {summary["dice_std"]:.3f}  pooled '
          f'{summary["dice_pooled"]:.3f}  Dice (grid) {summary["dice_grid_mean"]:.3f}'
          f'  -> {out_dir / "metrics.csv"}')
  logging.info(line)
  print(line, flush=True)
  return summary


def _write_csv(path: Path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.StringIO()
  w = csv.DictWriter(buf, FIELDS)
  w.writeheader()
  for r in rows:
    w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
  tmp = path.with_name('.' + path.name)
  tmp.write_text(buf.getvalue())
  os.replace(tmp, path)
