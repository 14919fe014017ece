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


def test_summary_skips_undefined_cases():
  rows = [{'dice': 0.5, 'hd95_mm': float('nan'), 'avd_percent': 10.0,
           'lesion_recall': 1.0, 'lesion_f1': 0.5},
          {'dice': float('nan'), 'hd95_mm': 4.0, 'avd_percent': 30.0,
           'lesion_recall': 0.0, 'lesion_f1': 0.0}]
  s = cm.summarize(rows)
  assert s == {'dice': 0.5, 'hd95_mm': 4.0, 'avd_percent': 20.0,
               'lesion_recall': 0.5, 'lesion_f1': 0.25}
