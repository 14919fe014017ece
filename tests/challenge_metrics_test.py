"""The challenge's five metrics on small hand-built volumes with known answers."""

import math

import numpy as np
import pytest

from wmh_jax import challenge_metrics as cm

EYE = np.eye(4)


def _vol(shape=(12, 12, 6)):
  return np.zeros(shape, np.uint8)


def test_dice_avd_and_label_two_masked_out_of_the_prediction():
  labels, pred = _vol(), _vol()
  labels[2:4, 2:4, 2] = 1   # 4 true voxels
  labels[8, 8, 2] = 2       # other pathology
  pred[2:4, 2, 2] = 1       # 2 of them found
  pred[8, 8, 2] = 1         # on label 2: ignored, not a false positive
  m = cm.challenge_metrics(labels, pred, EYE)
  assert m['dice'] == pytest.approx(2 * 2 / (4 + 2))
  assert m['avd_percent'] == pytest.approx(50.0)
  assert m['lesion_recall'] == 1.0 and m['lesion_f1'] == 1.0


def test_empty_prediction():
  labels = _vol()
  labels[2:4, 2:4, 2] = 1
  m = cm.challenge_metrics(labels, _vol(), EYE)
  assert m['dice'] == 0.0
  assert math.isnan(m['hd95_mm'])
  assert m['avd_percent'] == 100.0
  assert m['lesion_recall'] == 0.0 and m['lesion_f1'] == 0.0


def test_no_lesions_and_nothing_predicted():
  m = cm.challenge_metrics(_vol(), _vol(), EYE)
  assert math.isnan(m['dice']) and math.isnan(m['avd_percent'])
  assert m['lesion_recall'] == 1.0 and m['lesion_f1'] == 1.0


def test_no_lesions_but_a_false_positive():
  pred = _vol()
  pred[5, 5, 3] = 1
  m = cm.challenge_metrics(_vol(), pred, EYE)
  assert m['dice'] == 0.0
  # recall 1 (nothing to find), precision 0 (the only detection is wrong).
  assert m['lesion_recall'] == 1.0 and m['lesion_f1'] == 0.0


def test_prediction_threshold_depends_on_dtype():
  labels = _vol()
  labels[3, 3, 3] = 1
  assert cm.challenge_metrics(labels, labels.astype(np.float32) * 0.5, EYE)['dice'] == 1.0
  assert cm.challenge_metrics(labels, labels.astype(np.float32) * 0.49, EYE)['dice'] == 0.0
  assert cm.challenge_metrics(labels, (labels * 0.9).astype(np.int16), EYE)['dice'] == 0.0


def test_hd95_is_in_mm_with_anisotropic_spacing_and_any_orientation():
  labels, pred = _vol(), _vol()
  labels[3:8, 3:8, 2] = 1
  pred[3:8, 3:8, 3] = 1          # the same square one 3-mm slice up
  aniso = np.diag([0.5, 0.5, 3.0, 1.0])
  assert cm.challenge_metrics(labels, pred, aniso)['hd95_mm'] == pytest.approx(3.0)
  # An oblique, LPS-flipped affine with the same voxel sizes: same distance.
  c, s = np.cos(0.4), np.sin(0.4)
  rot = np.array([[-c, -s, 0], [s, -c, 0], [0, 0, 1.0]])
  oblique = np.eye(4)
  oblique[:3, :3] = rot @ np.diag([0.5, 0.5, 3.0])
  oblique[:3, 3] = (10, -20, 30)
  assert cm.challenge_metrics(labels, pred, oblique)['hd95_mm'] == pytest.approx(3.0)
  # In plane: a square shifted by 2 voxels of 0.5 mm along x.
  pred2 = _vol()
  pred2[5:10, 3:8, 2] = 1
  assert cm.challenge_metrics(labels, pred2, aniso)['hd95_mm'] == pytest.approx(1.0)


def test_hd95_takes_the_larger_of_the_two_directed_95th_percentiles():
  labels, pred = _vol((30, 5, 3)), _vol((30, 5, 3))
  labels[1, 2, 1] = labels[21, 2, 1] = 1     # two single-voxel lesions 20 mm apart
  pred[1, 2, 1] = 1                          # only the first found
  # truth->pred distances {0, 20}: 95th percentile 19; pred->truth {0}: 0.
  assert cm.hd95(*cm.masked_pair(labels, pred), EYE) == pytest.approx(19.0)


def test_boundary_is_the_in_plane_erosion_rim():
  mask = np.zeros((7, 7, 3), bool)
  mask[1:6, 1:6, :] = True                   # a 5x5x3 block
  rim = cm._boundary_mm(mask, EYE)           # pylint: disable=protected-access
  assert len(rim) == 16 * 3                  # 5x5 minus its 3x3 interior, each slice


def test_lesion_recall_and_f1_count_26_connected_components():
  labels, pred = _vol(), _vol()
  labels[1, 1, 1] = labels[2, 2, 2] = 1      # touch at a corner: one lesion
  labels[6, 6, 1] = 1                        # second lesion
  labels[9:11, 9, 4] = 1                     # third lesion
  pred[2, 2, 2] = 1                          # hits lesion 1
  pred[10, 9, 4] = pred[10, 10, 4] = 1       # hits lesion 3
  pred[6, 1, 4] = 1                          # false positive
  m = cm.challenge_metrics(labels, pred, EYE)
  assert m['lesion_recall'] == pytest.approx(2 / 3)
  assert m['lesion_f1'] == pytest.approx(2 / 3)   # precision 2/3 as well


def test_shape_mismatch_is_refused():
  with pytest.raises(ValueError, match='shape'):
    cm.challenge_metrics(_vol(), _vol((12, 12, 5)), EYE)


def test_known_prediction_gives_hand_computed_metrics():
  """Two 2x2x2 true lesions, A found exactly and B missed, and a 2x2x1 false
  positive C: every metric worked out by hand."""
  labels, pred = _vol((26, 16, 6)), _vol((26, 16, 6))
  labels[2:4, 2:4, 2:4] = 1        # A: 8 voxels
  labels[22:24, 2:4, 2:4] = 1      # B: 8 voxels, 19-20 mm from A along x
  labels[10, 10, 5] = 2            # other pathology, predicted: masked out
  pred[2:4, 2:4, 2:4] = 1          # A exactly
  pred[2:4, 12:14, 2] = 1          # C: 4 voxels, 9-10 mm from A along y
  pred[10, 10, 5] = 1
  m = cm.case_metrics(labels, pred, EYE)
  assert m['dice'] == pytest.approx(2 * 8 / (16 + 12))
  assert m['avd_percent'] == pytest.approx(abs(16 - 12) / 16 * 100)
  assert m['lesion_recall'] == pytest.approx(1 / 2)      # A of A, B
  assert m['lesion_f1'] == pytest.approx(1 / 2)          # precision: A of A, C
  # A 2x2 square erodes to nothing in plane: every voxel is boundary.
  # truth->pred: A 8 x 0, B 4 x 19 and 4 x 20 -> 95th percentile 20;
  # pred->truth: A 8 x 0, C 2 x 9 and 2 x 10 -> 10. HD95 = max = 20.
  assert m['hd95_mm'] == pytest.approx(20.0)
  assert m['true_volume_ml'] == pytest.approx(0.016)
  assert m['pred_volume_ml'] == pytest.approx(0.012)
  # Voxels 0.5 mm along x: B is 9.5-10 mm from A, C still 9-10 mm.
  half = cm.case_metrics(labels, pred, np.diag([0.5, 1.0, 1.0, 1.0]))
  assert half['hd95_mm'] == pytest.approx(10.0)
  assert half['true_volume_ml'] == pytest.approx(0.008)


def _summary_row(**kw):
  row = {'dice': 0.5, 'hd95_mm': 4.0, 'avd_percent': 10.0, 'lesion_recall': 1.0,
         'lesion_f1': 0.5, 'true_volume_ml': 1.0, 'pred_volume_ml': 1.0}
  row.update(kw)
  return row


def test_summary_skips_undefined_cases_and_counts_them():
  rows = [_summary_row(hd95_mm=float('nan'), pred_volume_ml=0.0),
          _summary_row(dice=float('nan'), avd_percent=float('nan'), hd95_mm=float('nan'),
                       lesion_f1=1.0, true_volume_ml=0.0, pred_volume_ml=0.0),
          _summary_row(dice=0.7, hd95_mm=8.0, avd_percent=30.0, lesion_recall=0.0,
                       lesion_f1=0.0)]
  s = cm.summarize(rows)
  assert s['dice'] == pytest.approx(0.6) and s['dice_n'] == 2
  assert s['dice_left_out'] == {'empty truth and prediction': 1}
  assert s['hd95_mm'] == pytest.approx(8.0) and s['hd95_mm_n'] == 1
  assert s['hd95_mm_left_out'] == {'empty prediction': 1,
                                   'empty truth and prediction': 1}
  assert s['avd_percent'] == pytest.approx(20.0) and s['avd_percent_n'] == 2
  assert s['lesion_recall_n'] == s['lesion_f1_n'] == 3
  assert s['lesion_f1_left_out'] == {}
  line = cm.summary_line(s, 3)
  assert line.startswith('3 cases  Dice 0.600 (n=2 of 3; 1 empty truth and prediction)'
                         '  HD95 8.00 mm (n=1 of 3; 1 empty prediction; 1 empty truth '
                         'and prediction)  AVD 20.0 % (n=2 of 3; 1 empty truth and '
                         'prediction)  lesion recall 0.667  lesion F1 0.500')
  # Without volumes the reason is unknown, but the count is still given.
  bare = cm.summarize([{m: float('nan') for m in cm.METRICS}])
  assert bare['hd95_mm_n'] == 0 and math.isnan(bare['hd95_mm'])
  assert bare['hd95_mm_left_out'] == {'undefined': 1}


def test_slice_areas_and_drop_by_the_largest_cross_section_on_a_slice():
  # A thick-slice scan (0.9 x 0.9 mm pixels, 6.5 mm slices along the last axis).
  spacing = (0.9, 0.9, 6.5)
  mask = np.zeros((16, 16, 6), bool)
  mask[1, 1:3, 1] = True        # a speck of 2 voxels: 1.62 mm^2, 10.5 mm^3
  mask[6:9, 6:9, 2] = True      # 3 x 3 voxels on one slice: 7.29 mm^2, 47.4 mm^3
  mask[12, 12, 1:4] = True      # a voxel on each of 3 slices: 0.81 mm^2, 15.8 mm^3
  cc, n = cm.lesions(mask)
  areas = cm.slice_areas(cc, n, spacing)
  by_lesion = {int(cc[1, 1, 1]): 1.62, int(cc[6, 6, 2]): 7.29, int(cc[12, 12, 1]): 0.81}
  for label, want in by_lesion.items():
    assert areas[label] == pytest.approx(want)
  drop = cm.drop_small_lesions
  assert drop(mask, spacing, 0.0, 0.0) is mask
  # By volume (10 mm^3) all three stay; by cross-section (2 mm^2) only the 3 x 3.
  np.testing.assert_array_equal(drop(mask, spacing, 10.0), mask)
  kept = drop(mask, spacing, 0.0, 2.0)
  assert kept.sum() == 9 and kept[6:9, 6:9, 2].all()
  # Both: a lesion must pass each.
  assert drop(mask, spacing, 12.0, 1.0).sum() == 9
  assert drop(mask, spacing, 12.0, 0.0).sum() == 12
  # The slice axis is the coarsest, wherever it lies in the file.
  moved = np.moveaxis(mask, 2, 0)
  np.testing.assert_array_equal(drop(moved, (6.5, 0.9, 0.9), 0.0, 2.0),
                                np.moveaxis(kept, 2, 0))
  # Isotropic 1 mm: the 3 x 3 lesion's largest cross-section across the first
  # axis is 3 voxels (a row), so 4 mm^2 drops it and 3 mm^2 keeps it.
  iso = (1.0, 1.0, 1.0)
  assert not drop(mask, iso, 0.0, 4.0)[6:9, 6:9, 2].any()
  assert drop(mask, iso, 0.0, 3.0)[6:9, 6:9, 2].all()


def test_drop_small_lesions_measures_26_connected_lesions_in_mm3():
  mask = np.zeros((12, 12, 6), bool)
  mask[1, 1, 1] = True                      # a speck: 2 mm^3
  mask[5, 5, 1] = mask[6, 6, 2] = True      # touching at a corner: one lesion, 4 mm^3
  mask[8:10, 8:10, 3:5] = True              # 8 voxels: 16 mm^3
  spacing = (1.0, 1.0, 2.0)
  drop = cm.drop_small_lesions
  assert drop(mask, spacing, 0.0) is mask
  np.testing.assert_array_equal(drop(mask, spacing, 2.0), mask)
  kept = drop(mask, spacing, 4.0)
  np.testing.assert_array_equal(kept, mask & ~(np.arange(12) == 1)[:, None, None])
  kept = drop(mask, spacing, 4.5)
  assert kept.sum() == 8 and kept[8:10, 8:10, 3:5].all()
  assert not drop(mask, spacing, 16.5).any()
  assert not drop(np.zeros_like(mask), spacing, 4.0).any()
