"""Score mode: any tool's predictions against challenge-layout ground truth.

  python launch.py --mode=score --gt=GT_DIR --pred=PRED_DIR [--output=DIR]

Ground truth: ``GT/SITE[/SCANNER]/ID/wmh.nii.gz``. For each case the prediction is
the first of ``PRED/SITE/ID/result.nii.gz``, ``PRED/ID/result.nii.gz`` (the
challenge's submission name), ``PRED/SITE_ID_wmh.nii.gz`` (what ``evaluate``
writes) and ``PRED/ID_wmh.nii.gz`` (what ``predict`` writes). Writes
``scores.csv`` (one row a case) in ``--output`` (default: ``PRED``) and prints the
mean of each metric.
"""

from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import challenge_metrics
from wmh_jax import metrics
from wmh_jax import nifti_io
from wmh_jax import tables

FIELDS = ('subject', *challenge_metrics.METRICS, 'true_volume_ml', 'pred_volume_ml')


def _candidates(pred_dir: Path, site: str, sid: str) -> list[Path]:
  flat_site = site.replace('/', '_')
  return [pred_dir / site / sid / 'result.nii.gz', pred_dir / sid / 'result.nii.gz',
          pred_dir / f'{flat_site}_{sid}_wmh.nii.gz', pred_dir / f'{sid}_wmh.nii.gz']


def find_pairs(gt_dir, pred_dir) -> list[tuple[str, Path, Path]]:
  """``(SITE/ID, ground truth, prediction)`` for every ground-truth case.

  Raises:
    FileNotFoundError: a folder is missing, holds no ground truth, or cases
      have no prediction (all of them are listed).
  """
  gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
  for d, what in ((gt_dir, 'ground-truth'), (pred_dir, 'prediction')):
    if not d.is_dir():
      raise FileNotFoundError(f'{d}: {what} folder does not exist')
  pairs, missing = [], []
  for gt in sorted(gt_dir.glob('**/wmh.nii.gz')):
    rel = gt.parent.relative_to(gt_dir).parts
    site, sid = '/'.join(rel[:-1]) or '.', rel[-1] if rel else gt_dir.name
    found = [p for p in _candidates(pred_dir, site, sid) if p.is_file()]
    if found:
      pairs.append((f'{site}/{sid}', gt, found[0]))
    else:
      missing.append(f'{site}/{sid}')
  if not pairs and not missing:
    raise FileNotFoundError(f'{gt_dir}: no ground truth found (expected '
                            'SITE/ID/wmh.nii.gz)')
  if missing:
    raise FileNotFoundError(
        f'{pred_dir}: no prediction for {len(missing)} case(s): '
        f'{", ".join(missing[:10])}{" ..." if len(missing) > 10 else ""} '
        '(expected ID/result.nii.gz or ID_wmh.nii.gz)')
  return pairs


def load_pair(gt_path, pred_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(labels, prediction, affine)`` on the ground truth's own grid, checked."""
  gt = nifti_io.load(gt_path, canonical=False)
  labels = nifti_io.check_labels(gt, gt_path)
  pred = nifti_io.load(pred_path, canonical=False)
  data = np.asanyarray(pred.dataobj)
  if data.shape != labels.shape:
    raise nifti_io.NiftiError(f'{pred_path}: shape {data.shape} differs from the '
                              f'ground truth {gt_path} {labels.shape}')
  if not np.allclose(pred.affine, gt.affine, atol=1e-3):
    raise nifti_io.NiftiError(f'{pred_path}: affine differs from the ground '
                              f'truth {gt_path} (not on the same grid)')
  if not np.all(np.isfinite(data)):
    raise nifti_io.NiftiError(f'{pred_path}: prediction has NaN or infinite voxels')
  return labels, data, gt.affine


def case_row(key, labels, pred, affine) -> dict:
  """The challenge's five metrics and the true and predicted volumes of a case."""
  row = {'subject': key, **challenge_metrics.challenge_metrics(labels, pred, affine)}
  truth, p = challenge_metrics.masked_pair(labels, pred)
  row['true_volume_ml'] = metrics.volume_ml(truth, affine)
  row['pred_volume_ml'] = metrics.volume_ml(p, affine)
  return row


def score_case(key, gt_path, pred_path) -> dict:
  return case_row(key, *load_pair(gt_path, pred_path))


def summary_line(summary: dict, n: int) -> str:
  return (f'{n} cases  Dice {summary["dice"]:.3f}  HD95 {summary["hd95_mm"]:.2f} mm'
          f'  AVD {summary["avd_percent"]:.1f} %  lesion recall '
          f'{summary["lesion_recall"]:.3f}  lesion F1 {summary["lesion_f1"]:.3f}')


def score(gt_dir, pred_dir, output=None, overwrite: bool = False) -> dict:
  """Scores every case; writes ``scores.csv``; returns the means."""
  out = Path(output or pred_dir) / 'scores.csv'
  if out.exists() and not overwrite:
    raise FileExistsError(f'{out}: already exists (pass --overwrite to replace)')
  pairs = find_pairs(gt_dir, pred_dir)
  rows = []
  for k, (key, gt, pred) in enumerate(pairs):
    rows.append(score_case(key, gt, pred))
    logging.info('score %d/%d %s Dice %.3f', k + 1, len(pairs), key, rows[-1]['dice'])
  tables.write_csv(out, rows, FIELDS, overwrite=overwrite)
  summary = challenge_metrics.summarize(rows)
  print(f'score: {summary_line(summary, len(rows))}  -> {out}', flush=True)
  return summary
