"""bench/outside_brain.py: lesion outside a given brain mask, truth and prediction."""

import nibabel as nib
import numpy as np
import pytest

from bench import outside_brain

AFFINE = np.diag([1.0, 2.0, 5.0, 1.0])   # 10 mm^3 a voxel: 0.01 mL


def _scan():
  shape = (12, 12, 4)
  brain = np.zeros(shape, np.uint8)
  brain[2:10, 2:10, :] = 1
  labels = np.zeros(shape, np.uint8)
  labels[8:12, 4:6, 1] = 1    # 4x2 voxels, half of them outside (x 10-11)
  labels[4:6, 4:6, 2] = 1     # inside
  labels[0:2, 0:2, 3] = 2     # other pathology outside: not lesion
  pred = np.zeros(shape, np.uint8)
  pred[9:12, 4:5, 1] = 1      # 1 voxel inside, 2 outside on true lesion
  pred[0:3, 9:11, 0] = 1      # 6 voxels, 5 outside the mask, all false
  return labels, brain, pred


def test_outside_splits_truth_and_prediction_by_the_mask():
  labels, brain, pred = _scan()
  row = outside_brain.outside(labels, brain, AFFINE, pred)
  assert row['lesions'] == 2 and row['lesions_partly_outside'] == 1
  assert row['truth_ml'] == pytest.approx(0.12)          # 8 + 4 voxels
  assert row['truth_outside_ml'] == pytest.approx(0.04)  # x 10-11 of the first
  assert row['truth_outside_median_mm'] == pytest.approx(1.5)  # 1 and 2 mm along x
  assert row['pred_outside_ml'] == pytest.approx(0.07)
  assert row['pred_outside_on_truth_ml'] == pytest.approx(0.02)
  assert row['pred_outside_false_ml'] == pytest.approx(0.05)
  assert 'pred_outside_ml' not in outside_brain.outside(labels, brain, AFFINE)


def _write(path, volume, affine):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(volume, affine), str(path))


def test_rows_read_a_challenge_layout_and_predict_outputs(tmp_path):
  labels, brain, pred = _scan()
  flair = np.random.default_rng(0).random(labels.shape).astype(np.float32)
  for sid in ('a', 'b'):
    _write(tmp_path / 'data' / 'S' / sid / 'pre' / 'FLAIR.nii.gz', flair, AFFINE)
    _write(tmp_path / 'data' / 'S' / sid / 'wmh.nii.gz', labels, AFFINE)
  _write(tmp_path / 'data' / 'S' / 'a' / 'brain.nii.gz', brain, AFFINE)  # b has none
  _write(tmp_path / 'pred' / 'a_wmh.nii.gz', pred, AFFINE)
  table = outside_brain.rows(tmp_path / 'data', tmp_path / 'pred')
  assert [name for name, _ in table] == ['a']   # only the scan with a brain mask
  assert table[0][1]['pred_outside_false_ml'] == pytest.approx(0.05)
  (tmp_path / 'pred' / 'a_wmh.nii.gz').unlink()
  with pytest.raises(FileNotFoundError, match='a_wmh.nii.gz: no predicted mask'):
    outside_brain.rows(tmp_path / 'data', tmp_path / 'pred')
  (tmp_path / 'data' / 'S' / 'a' / 'brain.nii.gz').unlink()
  with pytest.raises(FileNotFoundError, match='no scan with both'):
    outside_brain.rows(tmp_path / 'data')
