"""bench/loo_refiners.py: the threshold and smallest lesion training scans choose."""

import ml_collections
import numpy as np
import pytest

from bench import loo_refiners


def _rc(**over):
  rc = ml_collections.ConfigDict({
      'thresholds': (0.3, 0.4, 0.5, 0.6), 'threshold_rule': 'best',
      'min_lesion_mm3': (0.0, 10.0, 20.0), 'min_lesion_rule': 'best'})
  rc.update(over)
  return rc


def _case(shift):
  """A 4x4x2 lesion at 0.55, a rim around it at 0.45 (not lesion) and a lone
  voxel at 0.9 (not lesion): 0.5 and above keeps the lesion alone but for the
  speck, which a smallest lesion over 1 mm^3 drops."""
  labels = np.zeros((20, 20, 6), np.uint8)
  prob = np.zeros(labels.shape, np.float32)
  prob[3 + shift:11 + shift, 3:11, 1:5] = 0.45
  prob[5 + shift:9 + shift, 5:9, 2:4] = 0.55
  labels[5 + shift:9 + shift, 5:9, 2:4] = 1
  prob[17, 17, 5] = 0.9
  return labels, prob, (1.0, 1.0, 1.0)


def test_the_training_scans_choose_the_threshold_then_the_smallest_lesion():
  cases = [_case(0), _case(2)]
  assert loo_refiners.choose(cases, _rc()) == (0.5, 10.0)
  # The speck kept (no smallest lesion on offer) and a threshold under the rim.
  assert loo_refiners.choose(cases, _rc(min_lesion_mm3=(0.0,))) == (0.5, 0.0)
  assert loo_refiners.choose(cases, _rc(thresholds=(0.3, 0.4))) == (0.3, 10.0)


def test_scores_leave_out_other_pathology_and_drop_small_lesions():
  labels, prob, spacing = _case(0)
  dice, f1 = loo_refiners.scores(labels, prob >= 0.5, spacing)
  assert (dice, f1) == pytest.approx((64 / 65, 2 / 3))     # one true, one false lesion
  assert loo_refiners.scores(labels, prob >= 0.5, spacing, 10.0) == (1.0, 1.0)
  labels[17, 17, 5] = 2                                   # the speck: other pathology
  assert loo_refiners.scores(labels, prob >= 0.5, spacing) == (1.0, 1.0)
