"""Score mode: any tool's predictions against challenge-layout ground truth.

  python launch.py --mode=score --gt=GT_DIR --pred=PRED_DIR [--output=DIR]

Ground truth: ``GT/SITE[/SCANNER]/ID/wmh.nii.gz``. For each case the prediction is
the first of ``PRED/SITE/ID/result.nii.gz``, ``PRED/ID/result.nii.gz`` (the
challenge's submission name), ``PRED/SITE_ID_wmh.nii.gz`` (what ``evaluate``
writes) and ``PRED/ID_wmh.nii.gz`` (what ``predict`` writes). An ID that two cases
share is matched by the site-qualified names only: a flat ``ID/result.nii.gz`` or
``ID_wmh.nii.gz`` for it could be either case's, and is refused when it is all
there is. Writes ``scores.csv`` (one row
a case) in ``--output`` (default: ``PRED``) and prints the mean of each metric
with the number of cases it holds. The metrics are
``challenge_metrics.case_metrics`` on the files' own axes, as ``evaluate``'s.
"""

from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import challenge_metrics
from wmh_jax import nifti_io
from wmh_jax import tables

FIELDS = ('subject', *challenge_metrics.METRICS, *challenge_metrics.VOLUMES)


class AmbiguousPredictionError(ValueError):
  """A prediction named by an ID alone when several cases have that ID."""


def _candidates(pred_dir: Path, site: str, sid: str) -> list[tuple[Path, bool]]:
  """The names a case's prediction may have, in order, each with whether it
  names the site (``False``: the ID alone)."""
  flat_site = site.replace('/', '_')
  return [(pred_dir / site / sid / 'result.nii.gz', True),
          (pred_dir / sid / 'result.nii.gz', False),
          (pred_dir / f'{flat_site}_{sid}_wmh.nii.gz', True),
          (pred_dir / f'{sid}_wmh.nii.gz', False)]


def _prediction(pred_dir: Path, site: str, sid: str, sites_of_id: list[str]
                ) -> Path | None:
  """The case's prediction: the first candidate name that exists; when other
  cases share the ID, the first naming the site (a name with the ID alone could
  be any of them: refused when there is no other)."""
  shared = len(sites_of_id) > 1
  found = [p for p, qualified in _candidates(pred_dir, site, sid)
           if (qualified or not shared) and p.is_file()]
  if found or not shared:
    return found[0] if found else None
  flat = [p for p, qualified in _candidates(pred_dir, site, sid)
          if not qualified and p.is_file()]
  if flat:
    raise AmbiguousPredictionError(
        f'{flat[0]}: ID {sid} belongs to {len(sites_of_id)} cases '
        f'({", ".join(f"{s}/{sid}" for s in sites_of_id)}); name it '
        f'{site.replace("/", "_")}_{sid}_wmh.nii.gz or {site}/{sid}/result.nii.gz')
  return None


def find_pairs(gt_dir, pred_dir) -> list[tuple[str, Path, Path]]:
  """``(SITE/ID, ground truth, prediction)`` for every ground-truth case.

  Raises:
    FileNotFoundError: a folder is missing, holds no ground truth, or cases
      have no prediction (all of them are listed).
    AmbiguousPredictionError: a case's only prediction is named by an ID that
      other cases share.
  """
  gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
  for d, what in ((gt_dir, 'ground-truth'), (pred_dir, 'prediction')):
    if not d.is_dir():
      raise FileNotFoundError(f'{d}: {what} folder does not exist')
  cases = []
  for gt in sorted(gt_dir.glob('**/wmh.nii.gz')):
    rel = gt.parent.relative_to(gt_dir).parts
    cases.append(('/'.join(rel[:-1]) or '.', rel[-1] if rel else gt_dir.name, gt))
  sites_of = {}
  for site, sid, _ in cases:
    sites_of.setdefault(sid, []).append(site)
  pairs, missing = [], []
  for site, sid, gt in cases:
    found = _prediction(pred_dir, site, sid, sites_of[sid])
    if found:
      pairs.append((f'{site}/{sid}', gt, found))
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


def score_case(key, gt_path, pred_path) -> dict:
  """A case's row: its key and ``challenge_metrics.case_metrics`` on the files."""
  return {'subject': key, **challenge_metrics.case_metrics(
      *load_pair(gt_path, pred_path))}


def score(gt_dir, pred_dir, output=None, overwrite: bool = False) -> dict:
  """Scores every case; writes ``scores.csv``; returns the means, each with its
  count (``challenge_metrics.summarize``) and ``cases``, the number scored."""
  out = Path(output or pred_dir) / 'scores.csv'
  if out.exists() and not overwrite:
    raise FileExistsError(f'{out}: already exists (pass --overwrite to replace)')
  pairs = find_pairs(gt_dir, pred_dir)
  rows = []
  for k, (key, gt, pred) in enumerate(pairs):
    rows.append(score_case(key, gt, pred))
    logging.info('score %d/%d %s Dice %.3f', k + 1, len(pairs), key, rows[-1]['dice'])
  tables.write_csv(out, rows, FIELDS, overwrite=overwrite)
  summary = {'cases': len(rows), **challenge_metrics.summarize(rows)}
  print(f'score: {challenge_metrics.summary_line(summary, len(rows))}  -> {out}',
        flush=True)
  return summary
