"""bench/loo_refiners.py: the threshold and smallest lesion training scans choose."""

import json

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
  assert loo_refiners.choose(cases, _rc()) == (0.5, 10.0, 0.0)
  # The speck kept: no smallest lesion on offer.
  assert loo_refiners.choose(cases, _rc(min_lesion_mm3=(0.0,))) == (0.5, 0.0, 0.0)
  # Or dropped by its cross-section (1 mm^2; the lesion's is 16 mm^2).
  assert loo_refiners.choose(cases, _rc(min_lesion_mm3=(0.0,),
                                        min_lesion_mm2=(0.0, 2.0, 20.0))) == (0.5, 0.0, 2.0)
  # Under the rim every threshold marks it: the first of the equal ones.
  assert loo_refiners.choose(cases, _rc(thresholds=(0.3, 0.4))) == (0.3, 10.0, 0.0)


def test_scores_leave_out_other_pathology_and_drop_small_lesions():
  labels, prob, spacing = _case(0)
  dice, f1 = loo_refiners.scores(labels, prob >= 0.5, spacing)
  assert (dice, f1) == pytest.approx((64 / 65, 2 / 3))     # one true, one false lesion
  assert loo_refiners.scores(labels, prob >= 0.5, spacing, 10.0) == (1.0, 1.0)
  labels[17, 17, 5] = 2                                   # the speck: other pathology
  assert loo_refiners.scores(labels, prob >= 0.5, spacing) == (1.0, 1.0)


def _specks_case():
  """A large true lesion, two true 4 mm^3 lesions and eight false 1 mm^3 specks,
  all marked: dropping lesions under 10 mm^3 costs Dice (the two true small
  ones) but lifts lesion F1 (the eight false ones)."""
  labels = np.zeros((24, 24, 4), np.uint8)
  labels[2:6, 2:6, 0:2] = 1
  labels[10:12, 2:4, 1] = 1
  labels[14:16, 2:4, 1] = 1
  prob = labels.astype(np.float32)
  for i in range(8):
    prob[2 + 2 * (i % 4) + 12, 12 + 4 * (i // 4), 3] = 1.0
  return labels, prob, (1.0, 1.0, 1.0)


def test_the_smallest_lesion_is_chosen_by_dice_and_lesion_f1_together():
  labels, prob, spacing = _specks_case()
  every, large = (loo_refiners.scores(labels, prob >= 0.5, spacing, v) for v in (0.0, 10.0))
  assert every[0] > large[0]                      # Dice alone would keep them all
  assert sum(large) > sum(every)                  # Dice and F1 together drop them
  assert loo_refiners.choose([(labels, prob, spacing)],
                             _rc(thresholds=(0.5,), min_lesion_mm3=(0.0, 10.0))) == (0.5, 10.0, 0.0)


def test_the_one_standard_error_rule_keeps_the_higher_threshold():
  """Two scans whose rim (0.45) is lesion and one whose rim is not: 0.4 has the
  best mean Dice, 0.5 is within one standard error of it."""
  rim_lesion = []
  for _ in range(2):
    labels, prob, spacing = _case(0)
    labels[prob == 0.45] = 1
    rim_lesion.append((labels, prob, spacing))
  cases = rim_lesion + [_case(2)]
  rc = _rc(thresholds=(0.4, 0.5), min_lesion_mm3=(10.0,))
  assert loo_refiners.choose(cases, rc) == (0.4, 10.0, 0.0)
  rc.threshold_rule = 'one_se'
  assert loo_refiners.choose(cases, rc) == (0.5, 10.0, 0.0)


def test_a_fold_split_is_read_from_its_split_json(tmp_path):
  entry = lambda key: {'key': key, 'flair': 'sha', 'wmh': 'sha'}
  (tmp_path / 'split.json').write_text(json.dumps(
      {'val_ids': ['104252'], 'train': [entry('A/105074'), entry('A/105465')],
       'val': [entry('A/104252')], 'test': [entry('A/105911')]}))
  assert loo_refiners.fold_split(tmp_path) == (['A/105074', 'A/105465'], ['A/104252'])
  (tmp_path / 'split.json').write_text(json.dumps({'train': [entry('A/1')], 'val': []}))
  with pytest.raises(ValueError, match='no training or no held-out'):
    loo_refiners.fold_split(tmp_path)
  with pytest.raises(FileNotFoundError, match='split.json: missing'):
    loo_refiners.fold_split(tmp_path / 'elsewhere')
