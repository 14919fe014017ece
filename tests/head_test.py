"""The head around the brain (wmh_jax.head) on a tiny synthetic head."""

import numpy as np
import pytest

from wmh_jax import head


@pytest.fixture(scope='module')
def tiny():
  """An ellipsoid 'brain' (90 x 120 x 80 mm) in a 1 mm grid in MNI mm."""
  x, y, z = np.ogrid[-70:70, -60:100, -60:70]
  brain = (x / 45) ** 2 + ((y - 10) / 60) ** 2 + ((z - 10) / 40) ** 2 <= 1
  affine = np.eye(4)
  affine[:3, 3] = [-70, -60, -60]
  return brain, head.build(brain, affine)


def test_layers_run_from_the_brain_outwards(tiny):
  brain, h = tiny
  rng = np.random.default_rng(0)
  cls = head.classes(rng, h, np.zeros(brain.shape, np.float32), 'whole')
  assert (cls[brain] == 0).all()                      # nothing drawn on the brain
  # Along a ray from the centre to the right: CSF, bone (with diploe), then
  # muscle or fat, skin at the surface, then air.
  ray = cls[70:, 70, 70]
  seen = [int(c) for k, c in enumerate(ray) if c and (k == 0 or c != ray[k - 1])]
  assert seen[0] == head.CSF and head.BONE in seen and seen[-1] == head.SKIN, seen
  assert seen.index(head.BONE) < seen.index(head.FAT), seen
  assert ray[-1] == 0                                 # air outside the head
  assert (h.d_in[brain] > 0).all() and (h.d_out[brain] == 0).all()


def test_stripped_keeps_at_most_a_rim_and_defaced_spares_the_brain(tiny):
  brain, h = tiny
  noise = np.zeros(brain.shape, np.float32)
  stripped = head.classes(np.random.default_rng(1), h, noise, 'stripped')
  assert set(np.unique(stripped)) <= {0, head.CSF}
  assert h.d_out[stripped > 0].max() <= 3.5
  whole = head.classes(np.random.default_rng(2), h, noise, 'whole')
  defaced = head.classes(np.random.default_rng(2), h, noise, 'defaced')
  removed = (whole > 0) & (defaced == 0)
  assert removed.any()                                # the face is cut away...
  assert h.d_out[removed].min() > 12.0                # ...never near the brain
  assert (defaced[~removed] == whole[~removed]).all()


def test_tissue_outside_the_brain_can_outshine_lesions(tiny):
  """Over subjects, fat is drawn both darker and brighter than the brightest
  lesions (WMH contrast <= 2 x WM): brightness alone cannot tell them apart."""
  fats = [head.intensities(np.random.default_rng(k), 0.1)[head.FAT]
          for k in range(200)]
  assert min(fats) < 1.0 and max(fats) > 2.0


def test_draw_is_zero_on_the_brain_and_in_the_air(tiny):
  brain, h = tiny
  rng = np.random.default_rng(3)
  texture = rng.standard_normal(brain.shape).astype(np.float32) * 0.1
  img = head.draw(rng, h, np.zeros(brain.shape, np.float32), texture, 0.1, 'whole')
  assert img.dtype == np.float32
  assert (img[brain] == 0).all() and (img[h.d_in == 0] == 0).all()
  assert img.max() > 0.5                              # scalp fat or marrow
