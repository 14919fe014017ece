import numpy as np

from wmh_jax import evaluate
from wmh_jax import subjects


def _ceiling(labels, grid):
  return evaluate.grid_ceiling(labels, subjects.lesion_fraction(labels, grid))


def test_grid_ceiling_is_perfect_when_the_grid_is_the_native_grid():
  labels = np.zeros((16, 16, 8), np.uint8)
  labels[3:7, 4:9, 2:5] = 1
  labels[10:12, 10:12, 6] = 2
  assert _ceiling(labels, (16, 16, 8)) == 1.0


def test_grid_ceiling_loses_lesions_thinner_than_a_grid_voxel():
  labels = np.zeros((64, 64, 64), np.uint8)
  labels[20:40, 20:40, 10:50] = 1          # large: survives an 8x coarser grid
  assert _ceiling(labels, (64, 64, 8)) > 0.9
  labels[:] = 0
  labels[20:40, 20:40, 31] = 1             # one slice: 1/8 of a grid voxel
  assert _ceiling(labels, (64, 64, 8)) < 0.3
  labels[:] = 0
  assert np.isnan(_ceiling(labels, (64, 64, 8)))
