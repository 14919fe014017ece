"""Score mode: file matching, grid checks, the CSV, and the command line."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wmh_jax import nifti_io
from wmh_jax import score

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


def _labels():
  labels = np.zeros((10, 10, 4), np.uint8)
  labels[2:5, 2:5, 1] = 1
  labels[7, 7, 2] = 2
  return labels


@pytest.fixture()
def gt_pred(tmp_path):
  gt, pred = tmp_path / 'gt', tmp_path / 'pred'
  labels = _labels()
  for site, sid in (('Utrecht', '0'), ('Amsterdam/GE3T', '100')):
    nifti_io.save(gt / site / sid / 'wmh.nii.gz', labels, AFFINE, dtype=np.uint8)
  perfect = (labels == 1).astype(np.uint8)
  half = perfect.copy()
  half[2:5, 2, 1] = 0
  half[7, 7, 2] = 1  # on label 2: masked out
  nifti_io.save(pred / '0' / 'result.nii.gz', perfect, AFFINE, dtype=np.uint8)
  nifti_io.save(pred / '100_wmh.nii.gz', half, AFFINE, dtype=np.uint8)
  return gt, pred


def test_score_matches_both_names_and_writes_the_csv(gt_pred):
  gt, pred = gt_pred
  summary = score.score(gt, pred)
  rows = {r['subject']: r for r in csv.DictReader(open(pred / 'scores.csv'))}
  assert set(rows) == {'Utrecht/0', 'Amsterdam/GE3T/100'}
  assert float(rows['Utrecht/0']['dice']) == 1.0
  assert float(rows['Utrecht/0']['hd95_mm']) == 0.0
  assert float(rows['Amsterdam/GE3T/100']['dice']) == pytest.approx(2 * 6 / 15)
  assert float(rows['Amsterdam/GE3T/100']['true_volume_ml']) == pytest.approx(9 * 3 / 1000)
  assert summary['dice'] == pytest.approx((1 + 0.8) / 2)
  with pytest.raises(FileExistsError, match='--overwrite'):
    score.score(gt, pred)
  score.score(gt, pred, overwrite=True)


def test_missing_prediction_is_named(gt_pred):
  gt, pred = gt_pred
  (pred / '100_wmh.nii.gz').unlink()
  with pytest.raises(FileNotFoundError, match='Amsterdam/GE3T/100'):
    score.score(gt, pred)
  assert not (pred / 'scores.csv').exists()


def test_prediction_on_another_grid_is_refused(gt_pred):
  gt, pred = gt_pred
  nifti_io.save(pred / '100_wmh.nii.gz', np.zeros((10, 10, 5), np.uint8), AFFINE)
  with pytest.raises(nifti_io.NiftiError, match='100_wmh.nii.gz: shape'):
    score.score(gt, pred)
  nifti_io.save(pred / '100_wmh.nii.gz', np.zeros((10, 10, 4), np.uint8),
                np.diag([1.0, 1.0, 2.0, 1.0]))
  with pytest.raises(nifti_io.NiftiError, match='affine differs'):
    score.score(gt, pred)
  assert not (pred / 'scores.csv').exists()


def test_an_id_shared_by_two_sites_is_matched_by_site_only(tmp_path):
  gt, pred = tmp_path / 'gt', tmp_path / 'pred'
  labels = _labels()
  for site in ('Utrecht', 'Singapore'):
    nifti_io.save(gt / site / '0' / 'wmh.nii.gz', labels, AFFINE, dtype=np.uint8)
  perfect = (labels == 1).astype(np.uint8)
  empty = np.zeros_like(perfect)
  # One flat name for two cases: refused in one line naming the file and both cases.
  nifti_io.save(pred / '0_wmh.nii.gz', perfect, AFFINE, dtype=np.uint8)
  with pytest.raises(score.AmbiguousPredictionError,
                     match=r'0_wmh.nii.gz: ID 0 belongs to 2 cases \(Singapore/0, '
                           r'Utrecht/0\); name it Singapore_0_wmh.nii.gz') as e:
    score.score(gt, pred)
  assert '\n' not in str(e.value) and not (pred / 'scores.csv').exists()
  # One site named, the other only by the flat name: still refused.
  nifti_io.save(pred / 'Utrecht_0_wmh.nii.gz', perfect, AFFINE, dtype=np.uint8)
  with pytest.raises(score.AmbiguousPredictionError, match='Singapore'):
    score.score(gt, pred)
  # Both named by site: each case gets its own, and a flat ID/result.nii.gz
  # (which used to win over SITE_ID_wmh.nii.gz) is not used.
  nifti_io.save(pred / 'Singapore_0_wmh.nii.gz', empty, AFFINE, dtype=np.uint8)
  nifti_io.save(pred / '0' / 'result.nii.gz', empty, AFFINE, dtype=np.uint8)
  pairs = {k: p.name for k, _, p in score.find_pairs(gt, pred)}
  assert pairs == {'Utrecht/0': 'Utrecht_0_wmh.nii.gz',
                   'Singapore/0': 'Singapore_0_wmh.nii.gz'}
  summary = score.score(gt, pred)
  assert summary['cases'] == 2 and summary['dice'] == pytest.approx(0.5)
  # The empty prediction has no HD95: the mean says it holds one case of two.
  assert summary['hd95_mm'] == 0.0 and summary['hd95_mm_n'] == 1
  assert summary['hd95_mm_left_out'] == {'empty prediction': 1}


def test_score_prints_each_mean_with_its_count(gt_pred, capsys):
  gt, pred = gt_pred
  nifti_io.save(pred / '100_wmh.nii.gz', np.zeros((10, 10, 4), np.uint8), AFFINE,
                dtype=np.uint8)
  score.score(gt, pred)
  out = capsys.readouterr().out
  assert ('score: 2 cases  Dice 0.500  HD95 0.00 mm (n=1 of 2; 1 empty prediction)'
          '  AVD 50.0 %  lesion recall 0.500  lesion F1 0.500') in out
  rows = {r['subject']: r for r in csv.DictReader(open(pred / 'scores.csv'))}
  assert rows['Amsterdam/GE3T/100']['hd95_mm'] == 'nan'
  assert float(rows['Amsterdam/GE3T/100']['pred_volume_ml']) == 0.0


def test_score_command_line(gt_pred, tmp_path):
  gt, pred = gt_pred
  r = subprocess.run([sys.executable, str(ROOT / 'launch.py'), '--mode=score',
                      f'--gt={gt}', f'--pred={pred}', f'--output={tmp_path / "s"}'],
                     capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'score: 2 cases  Dice 0.900' in r.stdout
  assert (tmp_path / 's' / 'scores.csv').exists()
  r = subprocess.run([sys.executable, str(ROOT / 'launch.py'), '--mode=score',
                      f'--gt={gt}', f'--pred={tmp_path / "nope"}'],
                     capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert r.returncode == 1
  assert f'error: {tmp_path / "nope"}: prediction folder does not exist' in r.stderr
