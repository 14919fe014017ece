"""evaluate's metric rows (file axes, as score), its grid oracle and its summary."""

import math

import numpy as np
import pytest

from conftest import write_tiny_subject
from wmh_jax import challenge_metrics
from wmh_jax import evaluate
from wmh_jax import nifti_io
from wmh_jax import inference
from wmh_jax import score
from wmh_jax import subjects

# A sagittal-like, oblique file: axis 0 runs posterior (A->P, 1 mm), axis 1
# inferior (S->I, 1.2 mm), axis 2 is the 3-mm slice axis, left to right; rotated
# 0.2 rad about the slice axis. Its canonical (RAS) copy has other array axes.
_C, _S = np.cos(0.2), np.sin(0.2)
SAGITTAL = np.array([[0.0, 0.0, 3.0, -20.0],
                     [-_C * 1.0, _S * 1.2, 0.0, 15.0],
                     [-_S * 1.0, -_C * 1.2, 0.0, 40.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _oracle(labels, grid):
  return evaluate.grid_oracle_dice(labels, subjects.lesion_fraction(labels, grid))


def test_grid_oracle_is_perfect_when_the_grid_is_the_native_grid():
  labels = np.zeros((16, 16, 8), np.uint8)
  labels[3:7, 4:9, 2:5] = 1
  labels[10:12, 10:12, 6] = 2
  assert _oracle(labels, (16, 16, 8)) == 1.0


def test_grid_oracle_loses_lesions_thinner_than_a_grid_voxel():
  labels = np.zeros((64, 64, 64), np.uint8)
  labels[20:40, 20:40, 10:50] = 1          # large: survives an 8x coarser grid
  assert _oracle(labels, (64, 64, 8)) > 0.9
  labels[:] = 0
  labels[20:40, 20:40, 31] = 1             # one slice: 1/8 of a grid voxel
  assert _oracle(labels, (64, 64, 8)) < 0.3
  labels[:] = 0
  assert np.isnan(_oracle(labels, (64, 64, 8)))


def test_grid_oracle_is_not_an_upper_bound():
  """A grid output sharper than the blurred lesion fraction beats the oracle: a
  2-slice lesion on a grid 4 times coarser through-plane."""
  labels = np.zeros((8, 8, 24), np.uint8)
  labels[2:6, 2:6, 4:6] = 1
  fraction = subjects.lesion_fraction(labels, (8, 8, 6))
  oracle = evaluate.grid_oracle_dice(labels, fraction)
  sharp = (fraction >= 0.1).astype(np.float32)   # a model's confident grid output
  native, _ = inference.to_native(sharp, labels.shape, 0.5)
  sharper = challenge_metrics.dice(*challenge_metrics.masked_pair(labels, native >= 0.5))
  assert oracle == pytest.approx(4 / 7) and sharper == pytest.approx(2 / 3)


def _sagittal_subject(tmp_path):
  """A real prepared subject from files written with ``SAGITTAL``; its canonical
  labels and a canonical prediction: the lesions shifted one voxel, cut, plus a
  false positive."""
  folder = tmp_path / 'data' / 'Site' / '7'
  write_tiny_subject(folder, np.random.default_rng(3), shape=(30, 26, 9),
                     affine=SAGITTAL)
  s = subjects.SubjectFiles('Site', '7', folder / 'pre' / 'FLAIR.nii.gz',
                            folder / 'wmh.nii.gz')
  p = subjects.prepare_subject(s, (16, 16, 8))
  labels = p['native_labels']
  assert labels.shape != (30, 26, 9)       # canonical axes differ from the file's
  mask = np.roll(labels == 1, 1, axis=0)
  mask[:, :, :labels.shape[2] // 3] = False
  mask[1:3, 1:3, 1:3] = True
  return s, p, mask


def test_evaluate_and_score_rows_agree_on_a_sagittal_oblique_scan(tmp_path):
  s, p, mask = _sagittal_subject(tmp_path)
  via_evaluate = evaluate.case_row(p, mask)
  pred = nifti_io.save_like(tmp_path / 'pred' / 'Site_7_wmh.nii.gz',
                            mask.astype(np.uint8), s.flair)
  via_score = score.score_case(p['key'], s.wmh, pred)
  assert via_evaluate == via_score
  assert set(via_score) == {'subject', *challenge_metrics.METRICS,
                            *challenge_metrics.VOLUMES}
  assert 0 < via_score['dice'] < 1 and np.isfinite(via_score['hd95_mm'])
  # What evaluate used to do, metrics on the canonical (RAS) arrays, erodes along
  # other axes: another HD95 (the rest does not depend on the axes).
  canonical = challenge_metrics.case_metrics(p['native_labels'], mask, p['affine'])
  assert canonical['hd95_mm'] != pytest.approx(via_score['hd95_mm'], abs=1e-6)
  assert canonical['dice'] == via_score['dice']


def test_a_known_prediction_through_evaluate_gives_known_metrics(tmp_path):
  """The hand-computed case of challenge_metrics_test (two true 2x2x2 lesions, A
  found, B missed, a 2x2x1 false positive C), stored on permuted, flipped axes:
  evaluate's row (canonical arrays in, file axes inside) and score's row give
  the hand-computed values."""
  labels, pred = np.zeros((26, 16, 6), np.uint8), np.zeros((26, 16, 6), np.uint8)
  labels[2:4, 2:4, 2:4] = labels[22:24, 2:4, 2:4] = 1
  labels[10, 10, 5] = 2
  pred[2:4, 2:4, 2:4] = pred[10, 10, 5] = 1
  pred[2:4, 12:14, 2] = 1
  # File axes (0, 1, 2) point to world (-z, +x, -y), 1 mm each.
  affine = np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
  folder = tmp_path / 'Site' / '1'
  nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', 100.0 + labels.astype(np.float32),
                affine)
  nifti_io.save(folder / 'wmh.nii.gz', labels, affine, dtype=np.uint8)
  nifti_io.save(tmp_path / 'pred.nii.gz', pred, affine, dtype=np.uint8)
  s = subjects.SubjectFiles('Site', '1', folder / 'pre' / 'FLAIR.nii.gz',
                            folder / 'wmh.nii.gz')
  p = subjects.prepare_subject(s, (8, 8, 4))
  canonical = np.asarray(nifti_io.load(tmp_path / 'pred.nii.gz').dataobj) > 0
  assert canonical.shape != pred.shape
  row = evaluate.case_row(p, canonical)
  assert row == score.score_case('Site/1', s.wmh, tmp_path / 'pred.nii.gz')
  assert row == pytest.approx({
      'subject': 'Site/1', 'dice': 16 / 28, 'hd95_mm': 20.0, 'avd_percent': 25.0,
      'lesion_recall': 0.5, 'lesion_f1': 0.5, 'true_volume_ml': 0.016,
      'pred_volume_ml': 0.012})


def _row(key, dice, hd95, true_v=1.0, pred_v=1.0):
  return {'subject': key, 'dice': dice, 'hd95_mm': hd95, 'avd_percent': 10.0,
          'lesion_recall': 0.5, 'lesion_f1': 0.5, 'true_volume_ml': true_v,
          'pred_volume_ml': pred_v, 'dice_unet': dice, 'dice_grid': 0.4,
          'dice_grid_oracle': 0.7}


def test_summary_gives_each_mean_with_its_count():
  rows = [_row('a', 0.6, 10.0), _row('b', 0.8, 20.0), _row('c', 0.0, math.nan, 1.0, 0.0)]
  rows[0]['brain_dice'] = 0.9
  truth = np.zeros((4, 4, 4), np.uint8)
  summary = evaluate.summarize(rows, [truth > 0] * 3, [truth] * 3, 5, False)
  assert summary['subjects'] == 3 and summary['dice_n'] == 3
  assert summary['hd95_mm'] == pytest.approx(15.0) and summary['hd95_mm_n'] == 2
  assert summary['hd95_mm_left_out'] == {'empty prediction': 1}
  assert summary['dice_unet_n'] == summary['dice_grid_oracle_n'] == 3
  assert summary['brain_dice_mean'] == 0.9 and summary['brain_dice_n'] == 1
  assert summary['brain_dice_left_out'] == {'not scored': 2}
  line = evaluate.summary_line(summary)
  assert 'HD95 15.00 mm (n=2 of 3; 1 empty prediction)' in line
  assert 'Dice 0.467  HD95' in line       # every case counted: no note
  assert 'brain Dice 0.900 (n=1 of 3; 2 not scored)' in line
  assert 'grid oracle (an estimate, not a bound) 0.700' in line
