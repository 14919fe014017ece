"""The head around the brain for synthetic FLAIR: CSF, skull, scalp, orbits, face.

nilearn's MNI152 templates hold the brain alone, but clinical FLAIR shows the whole
head, and its brightest tissue is often outside the brain: scalp and orbital fat,
marrow, sinus mucosa. A network that never saw them marks them as lesion. This
module builds the rest of the head around the template's brain mask, once
(:func:`build`), and draws a subject's head with random layer thicknesses and
random tissue intensities (:func:`draw`, in the SynthSeg manner: any tissue may be
brighter than the lesions, so "brightest = lesion" never holds).

Geometry, in MNI mm on the template grid:
- layers by distance from the brain: subarachnoid CSF, inner table, diploe
  (marrow), outer table; by depth from the head's surface: skin, subcutaneous fat;
  muscle between them (the temporalis where the gap is wide);
- the head: the brain grown by ~16 mm (varied smoothly), and below the temporal
  lobes its cross-section carried down to the neck (face, skull base), narrowing
  below the chin;
- fixed structures placed from the template's landmarks: globes in fat-filled
  orbits, nasal cavity, maxillary and sphenoid sinuses, mastoid air cells (air
  with random mucosa);
- per subject: skull-stripped (brain only), whole head, or defaced.
"""

import dataclasses

import numpy as np
from scipy import ndimage

# Tissue classes outside the brain (0: air, or the brain itself).
CSF, BONE, DIPLOE, MUSCLE, FAT, SKIN, ORBIT_FAT, GLOBE, CAVITY, DEEP = range(1, 11)

# How the head is shown: skull-stripped, whole, defaced (face removed).
COVERAGE = ('stripped', 'whole', 'defaced')
COVERAGE_P = (0.2, 0.55, 0.25)


@dataclasses.dataclass(frozen=True)
class Head:
  d_out: np.ndarray    # mm from the brain (0 inside it), float32
  d_in: np.ndarray     # mm from the air outside the head (0 outside), float32
  fixed: np.ndarray    # uint8: ORBIT_FAT, GLOBE, CAVITY or 0
  world_y: np.ndarray  # MNI y (mm) of each grid index along axis 1
  world_z: np.ndarray  # MNI z (mm) of each grid index along axis 2


def _ellipsoid(grid, centre, radii):
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _fixed_noise(shape, sigma, seed):
  """Unit-std smooth noise of a fixed seed (part of the template, not a subject)."""
  rng = np.random.default_rng(seed)
  small = tuple(max(2, s // 4) for s in shape)
  n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / 4)
  n = ndimage.zoom(n, [s / m for s, m in zip(shape, small)], order=1)[
      tuple(slice(0, s) for s in shape)]
  n = np.pad(n, [(0, s - m) for s, m in zip(shape, n.shape)], mode='edge')
  return (n - n.mean()) / (n.std() + 1e-6)


def build(brain: np.ndarray, affine: np.ndarray) -> Head:
  """The head around ``brain`` (bool, 1 mm grid, ``affine`` to MNI mm)."""
  shape = brain.shape
  world = [affine[a, a] * np.arange(n, dtype=np.float32) + affine[a, 3]
           for a, n in enumerate(shape)]
  d_out = ndimage.distance_transform_edt(~brain).astype(np.float32)
  # The head: the brain grown by 16 +- 4 mm, varied smoothly over the surface.
  head = d_out <= 16.0 + 4.0 * _fixed_noise(shape, 12.0, 1)
  # Below the temporal lobes (MNI z -20), the section there carried down: face,
  # skull base and neck, narrowing by 0.6 mm a mm below z -65 (the chin).
  ref = int(np.argmin(np.abs(world[2] + 20.0)))
  depth = ndimage.distance_transform_edt(head[:, :, ref])
  for k in range(ref):
    head[:, :, k] |= depth > max(0.0, (-65.0 - float(world[2][k])) * 0.6)
  head = ndimage.binary_fill_holes(head | brain)
  d_in = ndimage.distance_transform_edt(head).astype(np.float32)

  x, y, z = np.meshgrid(*world, indexing='ij', sparse=True)
  grid = (x, y, z)
  fixed = np.zeros(shape, np.uint8)
  for s in (-1.0, 1.0):
    fixed[_ellipsoid(grid, (s * 28, 46, -34), (15, 24, 13))] = ORBIT_FAT
    fixed[_ellipsoid(grid, (s * 26, 52, -58), (13, 16, 14))] = CAVITY   # maxillary
    fixed[_ellipsoid(grid, (s * 50, -30, -45), (10, 12, 10))] = CAVITY  # mastoid
  fixed[(np.abs(x) <= 11) & (y >= 25) & (y <= 85) & (z >= -75) & (z <= -28)] = CAVITY
  fixed[_ellipsoid(grid, (0, 18, -42), (12, 12, 10))] = CAVITY           # sphenoid
  for s in (-1.0, 1.0):
    fixed[_ellipsoid(grid, (s * 32, 60, -36), (12, 12, 11.5))] = GLOBE
  fixed[(d_out <= 4.0) | ~head] = 0  # never over the brain's own CSF and bone
  return Head(d_out=d_out, d_in=d_in, fixed=fixed, world_y=world[1],
              world_z=world[2])


def _thickness(rng, lo, hi, noise, amount):
  return rng.uniform(lo, hi) * (1.0 + amount * noise)


def classes(rng, head: Head, noise: np.ndarray, coverage: str) -> np.ndarray:
  """Tissue class of every voxel outside the brain for one subject (uint8).

  ``noise``: a subject's unit-std smooth noise on the template grid; it varies
  the layer thicknesses over the head.
  """
  d_out, d_in = head.d_out, head.d_in
  cls = np.zeros(d_out.shape, np.uint8)
  t_csf = _thickness(rng, 1.0, 3.5, noise, 0.3)
  if coverage == 'stripped':  # brain extraction leaves at most a rim of CSF
    cls[(d_out > 0) & (d_out <= t_csf * rng.uniform(0.0, 0.8))] = CSF
    return cls
  t_bone = t_csf + _thickness(rng, 4.0, 9.0, -noise, 0.25)
  t_skin = rng.uniform(1.0, 2.5)
  t_fat = t_skin + _thickness(rng, 2.0, 8.0, noise, 0.4)
  outside = (d_out > 0) & (d_in > 0)
  cls[outside] = MUSCLE
  cls[outside & (d_in <= t_fat)] = FAT
  cls[outside & (d_in <= t_skin)] = SKIN
  cls[outside & (d_out > t_bone) & (d_in > t_fat) & (head.world_z[None, None] < -15)
      ] = DEEP
  bone = (d_out > t_csf) & (d_out <= t_bone)
  cls[bone & outside] = BONE
  marrow = rng.uniform(0.25, 0.6)  # share of the skull that is diploe
  mid = (t_csf + t_bone) / 2
  cls[bone & outside & (np.abs(d_out - mid) <= marrow * (t_bone - t_csf) / 2)] = DIPLOE
  cls[(d_out > 0) & (d_out <= t_csf)] = CSF
  place = (head.fixed > 0) & (d_out > t_csf + 1.0)
  cls[place] = head.fixed[place]
  if coverage == 'defaced':  # a plane through the face, never near the brain
    y0 = rng.uniform(55.0, 80.0)
    y, z = head.world_y[None, :, None], head.world_z[None, None, :]
    cls[(y > y0 - 0.6 * (z + 30.0)) & (z < -10.0) & (d_out > 12.0)] = 0
  return cls


def intensities(rng, c_csf: float) -> dict[int, float]:
  """FLAIR intensity of each class relative to white matter, drawn per subject.

  Fat and mucosa range past the brightest lesions (on clinical 2-D FLAIR the
  scalp fat reaches ~3x the brain's median); bone and air are dark.
  """
  fat = rng.uniform(0.7, 3.5)
  return {CSF: c_csf, BONE: rng.uniform(0.0, 0.12), DIPLOE: rng.uniform(0.15, 1.8),
          MUSCLE: rng.uniform(0.3, 0.85), FAT: fat, SKIN: rng.uniform(0.4, 1.5),
          ORBIT_FAT: fat * rng.uniform(0.8, 1.15), GLOBE: rng.uniform(0.02, 0.35),
          CAVITY: rng.uniform(0.0, 0.03), DEEP: rng.uniform(0.3, 0.85)}


def draw(rng, head: Head, noise: np.ndarray, texture: np.ndarray, c_csf: float,
         coverage: str) -> np.ndarray:
  """A subject's FLAIR outside the brain (float32, 0 inside it and in the air).

  ``texture``: unit-std fine noise on the template grid (tissue texture); air
  cavities get mucosa where it is high, deep face tissue is fat where ``noise``
  is high and muscle elsewhere.
  """
  cls = classes(rng, head, noise, coverage)
  values = intensities(rng, c_csf)
  lut = np.zeros(max(values) + 1, np.float32)
  for k, v in values.items():
    lut[k] = v
  img = lut[cls]
  deep = cls == DEEP
  img[deep & (noise > rng.uniform(-0.5, 0.8))] = values[FAT]
  img[(cls == CAVITY) & (texture + noise > rng.uniform(0.5, 3.0))] = (
      rng.uniform(0.5, 3.0))  # mucosa lining the sinuses
  return img * (1.0 + 0.08 * texture) * (cls > 0)
