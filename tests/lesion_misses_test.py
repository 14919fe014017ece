"""bench/lesion_misses.py: each true lesion's fate, by size."""

import numpy as np
import pytest

from bench import lesion_misses as misses


def _scan():
  """Four true lesions, one for each fate, and what a refined run gave them."""
  shape = (24, 24, 6)
  truth = np.zeros(shape, bool)
  boxes = {'found': np.s_[2:6, 2:6, 1:3],
           'no_candidate': np.s_[10:12, 2:4, 1:2],
           'below_threshold': np.s_[2:5, 12:15, 3:5],
           'dropped_small': np.s_[18:20, 18:20, 2:3]}
  for box in boxes.values():
    truth[box] = True
  unet = np.full(shape, 1e-7, np.float32)
  unet[boxes['no_candidate']] = 3e-6          # under the candidate level 1e-5
  for name in ('found', 'below_threshold', 'dropped_small'):
    unet[boxes[name]] = 0.01
  prob = unet.copy()
  prob[boxes['found']] = 0.9
  prob[boxes['below_threshold']] = 0.2
  prob[boxes['dropped_small']] = 0.7           # kept by the threshold...
  mask = prob >= 0.5
  mask[boxes['dropped_small']] = False          # ...then dropped as too small
  return truth, unet, prob, mask, boxes


def test_each_true_lesion_gets_its_fate_volume_and_unet_maximum():
  truth, unet, prob, mask, boxes = _scan()
  spacing = (1.0, 1.0, 2.0)
  rows = misses.lesion_fates(truth, unet, prob, mask, spacing, candidate=1e-5,
                             threshold=0.5)
  assert sorted(f for _, f, _ in rows) == sorted(boxes)
  by_fate = {f: (v, u) for v, f, u in rows}
  for name, box in boxes.items():
    volume, unet_max = by_fate[name]
    assert volume == pytest.approx(truth[box].sum() * 2.0)
    assert unet_max == pytest.approx(float(unet[box].max()))
  # Without a refiner: found or not, at the mask it was given.
  plain = misses.lesion_fates(truth, unet, unet, unet >= 0.005, spacing)
  assert sorted(f for _, f, _ in plain) == ['below_threshold', 'found', 'found',
                                            'found']
  assert misses.lesion_fates(np.zeros_like(truth), unet, prob, mask, spacing,
                             1e-5, 0.5) == []
  # A U-Net probability equal to the candidate level, in float32 as the refiner
  # compares it, is a candidate.
  level = unet.copy()
  level[boxes['no_candidate']] = np.float32(2e-4)
  rows = misses.lesion_fates(truth, level, prob, mask, spacing, candidate=2e-4,
                             threshold=0.5)
  assert 'no_candidate' not in [f for _, f, _ in rows]


def test_table_shares_by_size_and_the_lower_levels():
  rows = [(10.0, 'found', 0.9), (20.0, 'no_candidate', 3e-6),
          (30.0, 'no_candidate', 2e-8), (200.0, 'below_threshold', 0.01)]
  lines = misses.table(rows, ['50'], [1e-5, 1e-6, 1e-7]).splitlines()
  assert [l.split()[0] for l in lines[1:]] == ['0-50', '50-inf', 'all']
  small = lines[1].split()
  assert small[1] == '3'
  assert [float(x) for x in small[2:6]] == pytest.approx([1 / 3, 2 / 3, 0, 0], abs=0.01)
  assert small[-3:] == ['0.00', '0.50', '0.50']   # of the two without a candidate
  big = lines[2].split()
  assert big[1] == '1' and big[-3:] == ['-', '-', '-']
  assert lines[3].split()[1] == '4'
