import numpy as np
import pytest

from wmh_jax import synthetic


def _iso_geometry():
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [-80, -110, -60]
  return (160, 190, 150), np.ones(3), affine


def test_same_seed_identical_subject():
  a = synthetic.generate_subject(5, 1)
  b = synthetic.generate_subject(5, 1)
  np.testing.assert_array_equal(a.flair, b.flair)
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.affine, b.affine)
  c = synthetic.generate_subject(5, 2)
  assert a.flair.shape != c.flair.shape or not np.array_equal(a.flair, c.flair)


@pytest.mark.parametrize('load_ml', [2.0, 20.0])
def test_lesion_volume_close_to_requested_at_1mm(load_ml):
  s = synthetic.generate_subject(0, 3, load_ml=load_ml, geometry=_iso_geometry())
  got = (s.labels == 1).sum() / 1000.0   # 1 mm^3 voxels
  # The pose scales the head by up to ~12 %, so the load follows within that.
  assert abs(got - load_ml) / load_ml < 0.2, got
  assert set(np.unique(s.labels)) <= {0, 1, 2}


def test_lesions_brighter_than_tissue():
  s = synthetic.generate_subject(0, 4, load_ml=10.0, geometry=_iso_geometry())
  flair = s.flair.astype(np.float32)
  brain = flair > np.percentile(flair, 60)
  assert np.median(flair[s.labels == 1]) > np.median(flair[brain & (s.labels == 0)])
