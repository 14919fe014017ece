"""Offline synthetic FLAIR + WMH subjects on real brain anatomy.

Anatomy comes from the MNI152 ICBM 2009a templates that ship inside nilearn's
wheel (read by path; nothing is downloaded). Each subject is the template under a
random pose, size, elastic warp and ventricle enlargement, with white matter
hyperintensities (periventricular caps and rims growing with load, plus many
small punctate and ovoid lesions, in half the subjects some more below the
ventricles: temporal lobes, brainstem, cerebellum, and in half a thin lining
along stretches of the ventricles' walls; marked in ``wmh.nii.gz``
from 3 mm across, as raters mark them), sometimes lacunes (label 2), the
lesions' look-alikes (bright cortex, choroid plexus, septum pellucidum, CSF flow
artefacts), FLAIR contrasts drawn per subject, the head around the brain
(``wmh_jax.head``: scalp, skull, orbits, sinuses, face; whole, defaced or
stripped), texture, bias field and Rician noise, acquired on a randomised grid
(spacing, slice thickness with through-plane blur, matrix, orientation, head
coverage, dtype). Each subject has its brain mask (``brain.nii.gz``).

``generate_subject(seed, index)`` is a pure function of its arguments.
"""

import concurrent.futures
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from wmh_jax import challenge_metrics
from wmh_jax import head as head_lib
from wmh_jax import nifti_io
from wmh_jax import subjects

SITES = ('Synth2D', 'Synth3mm', 'Synth3D')  # acquisition families, one a site
# Bump when a seed's subjects change: the wmh_synthetic TFDS version and the
# marker file of generated folders carry it.
GENERATOR_VERSION = '3.4.0'
# The smallest lesion a rater marks: a ball 3 mm across (14 mm^3). The MS
# criteria count lesions of 3 mm or more along their long axis, and STRIVE takes
# smaller round foci for perivascular spaces. Smaller foci the generator draws
# stay in the image, unmarked, as on real scans (3.2.0; 3.0.0 marked them;
# 3.1.0 was stop 23's look-alike generator, not adopted).
MIN_MARKED_MM3 = float(np.pi / 6 * 3.0 ** 3)
# Template voxels (1 mm) each side of the midline where no white-matter lesion is
# drawn: the septum pellucidum and the falx, not white matter.
MIDLINE_MARGIN = 3


@dataclasses.dataclass(frozen=True)
class Template:
  gm: np.ndarray          # tissue probabilities on the 1 mm template grid
  wm: np.ndarray
  csf: np.ndarray
  brain: np.ndarray       # bool
  vent: np.ndarray        # bool: the lateral ventricles
  head: head_lib.Head     # the head around the brain
  affine: np.ndarray      # template voxel -> MNI world (mm)
  midline: int           # index of MNI x = 0 along the first axis
  dist_vent: np.ndarray   # mm from the lateral ventricles
  vent_y_range: tuple[float, float]  # anterior-posterior extent of the ventricles


def _template_dir() -> Path:
  spec = importlib.util.find_spec('nilearn')
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError('nilearn is not installed: it ships the MNI152 templates')
  return Path(list(spec.submodule_search_locations)[0]) / 'datasets' / 'data'


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
  """Reads the templates and derives CSF, ventricles and distance maps (cached)."""
  folder = _template_dir()
  read = lambda n: nifti_io.load(
      folder / f'mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz',
      canonical=False)
  t1 = read('t1')
  brain = ndimage.binary_fill_holes(np.asarray(t1.dataobj) > 0)
  # The brain's box plus room for the head (mm = voxels: x, y back and front,
  # z below and above; the face and neck reach past the template's own grid).
  idx = np.argwhere(brain)
  lo = idx.min(0) - np.array([24, 26, 28])
  hi = idx.max(0) + 1 + np.array([24, 34, 26])
  affine = t1.affine.copy()
  affine[:3, 3] += affine[:3, :3] @ lo
  box = lambda a: _crop_padded(a, lo, hi)
  brain = box(brain)
  gm = box(np.asarray(read('gm').dataobj, np.float32)) / 255.0
  wm = box(np.asarray(read('wm').dataobj, np.float32)) / 255.0
  csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
  depth = ndimage.distance_transform_edt(brain)
  # Lateral ventricles: the large CSF components deep in the brain, off the midline.
  cand = (csf > 0.6) & (depth > 12)
  midline = int(round(np.linalg.inv(affine)[0] @ np.array([0, 0, 0, 1])))
  cand[midline - 1:midline + 2] = False
  lab, n = ndimage.label(cand)
  sizes = ndimage.sum(cand, lab, range(1, n + 1))
  keep = 1 + np.argsort(sizes)[::-1][:2]
  vent = np.isin(lab, keep)
  ys = np.nonzero(vent.any(axis=(0, 2)))[0]
  return Template(
      gm=gm, wm=wm, csf=csf, brain=brain, vent=vent,
      head=head_lib.build(brain, affine), affine=affine, midline=midline,
      dist_vent=ndimage.distance_transform_edt(~vent).astype(np.float32),
      vent_y_range=(float(ys.min()), float(ys.max())))


def _crop_padded(a: np.ndarray, lo, hi) -> np.ndarray:
  """``a[lo:hi]`` per axis, zero-padded where the box leaves the array."""
  pad = [(max(0, -l), max(0, h - n)) for l, h, n in zip(lo, hi, a.shape)]
  a = np.pad(a, pad)
  return a[tuple(slice(l + p[0], h + p[0]) for l, h, p in zip(lo, hi, pad))]


def _smooth_noise(rng, shape, sigma_vox, coarse=4):
  """Zero-mean, unit-std smooth noise, drawn on a coarse grid for speed."""
  small = tuple(max(2, s // coarse) for s in shape)
  n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32),
                              sigma_vox / coarse)
  n = _upsample(n, shape)
  return (n - n.mean()) / (n.std() + 1e-6)


def _kth_largest(values: np.ndarray, k: int):
  """The ``k``-th largest of ``values`` (1 <= k <= values.size): the threshold
  that keeps ``k`` of them, ties aside."""
  return np.partition(values, values.size - k)[values.size - k]


def _upsample(small: np.ndarray, shape) -> np.ndarray:
  """Linear upsampling of a coarse grid to ``shape``, corners on corners."""
  return subjects.interpolate_linear(
      small, [np.linspace(0.0, m - 1.0, n) for m, n in zip(small.shape, shape)])


def _sample(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
  """``map_coordinates(order=1)`` at ``coords``, evaluated only in the box of
  output voxels the nonzero part of ``volume`` can reach (zero elsewhere):
  lesions and lacunes fill a small part of the head."""
  out = np.zeros(coords.shape[1:], np.float32)
  source = challenge_metrics.bounding_box(volume > 0)
  if source is None:
    return out
  # Linear interpolation reaches a nonzero voxel from within one voxel of its box.
  inside = np.ones(coords.shape[1:], bool)
  for a, s in enumerate(source):
    inside &= (coords[a] >= s.start - 1) & (coords[a] <= s.stop)
  box = challenge_metrics.bounding_box(inside)
  if box is not None:
    out[box] = ndimage.map_coordinates(volume, coords[(slice(None), *box)], order=1,
                                       cval=0.0)
  return out


def _resample(to_tpl: np.ndarray, warps, volumes) -> list[np.ndarray]:
  """Samples template-grid ``volumes`` (linear) at each output voxel ``v``:
  ``to_tpl @ v + warp(v)``. The first volume everywhere, the rest (sparse) where
  they are nonzero; slabs of the output run on threads (ndimage releases the
  GIL), and each voxel's value does not depend on the slabs."""
  shape = warps[0].shape
  idx = [np.arange(n, dtype=np.float32) for n in shape]

  def slab(sl):
    coords = np.empty((3, sl.stop - sl.start, *shape[1:]), np.float32)
    for a in range(3):
      r = to_tpl[a]
      coords[a] = warps[a][sl]
      coords[a] += (r[0] * idx[0][sl, None, None] + r[1] * idx[1][None, :, None] +
                    (r[2] * idx[2] + r[3])[None, None, :])
    return ([ndimage.map_coordinates(volumes[0], coords, order=1, cval=0.0)] +
            [_sample(v, coords) for v in volumes[1:]])

  n = max(1, min(os.cpu_count() or 1, 4, shape[0]))
  edges = np.linspace(0, shape[0], n + 1).astype(int)
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    parts = list(pool.map(slab, [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]))
  return [np.concatenate(p, axis=0) for p in zip(*parts)]


def near_midline(tpl: Template) -> slice:
  """The template's sagittal slices within ``MIDLINE_MARGIN`` of the midline."""
  return slice(tpl.midline - MIDLINE_MARGIN, tpl.midline + MIDLINE_MARGIN + 1)


def lesion_map(rng, tpl: Template, load_ml: float, vent_grow: float,
               wm: np.ndarray, rough: np.ndarray) -> np.ndarray:
  """Lesion mask on the template grid with ``load_ml`` mL (1 mm voxels).

  Periventricular: a field falling off with distance from the (enlarged)
  ventricles, stronger at the frontal and occipital horns and longer-ranged with
  load (caps -> rim -> confluent), roughened by smooth noise, in white matter only.
  Deep: many small irregular punctate or ovoid lesions away from the ventricles,
  most of them a few mm across (as in real scans, where most lesions cover a few
  voxels on one or two slices). None within ``MIDLINE_MARGIN`` mm of the midline.
  """
  shape = wm.shape
  dist = np.maximum(tpl.dist_vent - vent_grow, 0.0)
  reach = 2.0 + 3.0 * np.log1p(load_ml)                  # mm, grows with load
  y = np.arange(shape[1], dtype=np.float32)[None, :, None]
  y0, y1 = tpl.vent_y_range
  horn = np.clip(np.maximum(y0 + 15 - y, y - (y1 - 15)) / 15.0, 0, 1.5)
  field = np.exp(-dist / reach) * (0.6 + 0.6 * horn)
  field = field * (1 + 0.35 * _smooth_noise(rng, shape, 3.0))
  eligible = (wm > 0.5) & (dist > 0.5)
  eligible[near_midline(tpl)] = False
  deep_fraction = rng.uniform(0.1, 0.5)
  n_peri = int(round(load_ml * 1000 * (1 - deep_fraction)))
  values = field[eligible]
  les = np.zeros(shape, bool)
  if n_peri > 0:
    les = eligible & (field >= _kth_largest(values, n_peri))
  _scatter(rng, les, np.argwhere(eligible & (dist > 8)), eligible,
           load_ml * 1000 - les.sum(), rough)
  return les


def _scatter(rng, les: np.ndarray, cand: np.ndarray, eligible: np.ndarray,
             target: float, rough: np.ndarray) -> None:
  """Adds to ``les`` (in place) small lesions centred on rows of ``cand``,
  inside ``eligible``, until ``target`` voxels are added (600 at most): noisy
  ellipsoids, radius log-uniform in 1-4 mm (most small), each axis stretched by
  up to 1.6 (ovoid)."""
  shape = les.shape
  for _ in range(600):
    if target <= 0 or cand.size == 0:
      break
    c = cand[rng.integers(len(cand))]
    r = float(np.exp(rng.uniform(np.log(1.0), np.log(4.0))))
    stretch = rng.uniform(0.7, 1.6, 3)
    lo = np.maximum(c - 7, 0)
    hi = np.minimum(c + 8, shape)
    zz = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d2 = sum(((g - ci) / st) ** 2 for g, ci, st in zip(zz, c, stretch))
    ball = (np.sqrt(d2) + 0.25 * r * rough[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            < r) & eligible[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    sub = les[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    target -= (ball & ~sub).sum()
    sub |= ball


def inferior_lesions(rng, tpl: Template, load_ml: float, wm: np.ndarray,
                     vent: np.ndarray, rough: np.ndarray) -> np.ndarray:
  """Lesions in the white matter below the lateral ventricles' floor (MNI z
  -3 mm), on the template grid: temporal (beside the temporal horns), inferior
  frontal and occipital white matter, the brainstem and the cerebellar white
  matter and peduncles, the midline included (pontine lesions), where MS and
  small-vessel disease put them too. Half the subjects have some:
  ``U(0.05, 0.3) * load_ml`` mL (1 mm voxels; at the smallest loads one lesion
  may hold more), drawn as :func:`lesion_map`'s deep lesions.
  """
  les = np.zeros(wm.shape, bool)
  if rng.uniform() >= 0.5:
    return les
  floor = int(np.nonzero(tpl.vent.any(axis=(0, 1)))[0].min())
  eligible = (wm > 0.5) & ~vent
  eligible[:, :, floor:] = False
  _scatter(rng, les, np.argwhere(eligible), eligible,
           rng.uniform(0.05, 0.3) * load_ml * 1000, rough)
  return les


def ventricle_lining(rng, tpl: Template, grow: float, wm: np.ndarray, gm: np.ndarray,
                     load_ml: float) -> np.ndarray:
  """A thin periventricular lining on the template grid (generator 3.4.0): in
  half the subjects, ``U(0.1, 0.3) * load_ml`` mL (1 mm voxels) of a band
  ``U(2, 3.5)`` mm thick along the lateral ventricles' walls, in the stretches
  where a smooth random field is highest, abutting the CSF (the other
  periventricular lesions start past 0.5 mm and grow as caps at the horns).
  Real FLAIR shows such a thin lining in many older and MS subjects, and
  raters mark it (Fazekas' periventricular grade 1); MS3SEG's misses include
  it. Thinner (1-2.5 mm), it did not show once blurred (the lesion edge, the
  ventricle's partial volume, thick slices), and the model trained on it did
  worse everywhere (docs/results.md, stop 44).

  Args:
    rng: the lining's own stream (a subject without it is as in 3.3.0).
    tpl: the template.
    grow: mm the subject's ventricles are enlarged by (``tpl.dist_vent < grow``).
    wm, gm: the subject's tissue probabilities (0 in the enlarged ventricles);
      the lining lies where they sum to more than 0.3, not in CSF.
    load_ml: the subject's lesion load, of which the lining is a share.

  Not within ``MIDLINE_MARGIN`` voxels of the midline (the septum pellucidum).
  """
  les = np.zeros(wm.shape, bool)
  if rng.uniform() >= 0.5:
    return les
  thick = rng.uniform(2.0, 3.5)
  dist = tpl.dist_vent - grow
  band = (dist > 0) & (dist <= thick) & ((wm + gm) > 0.3)
  band[near_midline(tpl)] = False
  want = int(round(rng.uniform(0.1, 0.3) * load_ml * 1000))
  rough = _smooth_noise(rng, wm.shape, 4.0)[band]
  if want <= 0 or not rough.size:
    return les
  if want >= rough.size:
    return band
  les[band] = rough >= _kth_largest(rough, want)
  return les


def _blob(centre, radius: float):
  """``(box, ball)``: the slices around ``centre`` and a ball of ``radius`` in them
  (the box is clipped at 0 only; numpy clips its upper ends)."""
  r = int(np.ceil(radius)) + 1
  box = tuple(slice(max(c - r, 0), c + r + 1) for c in centre)
  zz = np.ogrid[box]
  return box, sum((g - c) ** 2 for g, c in zip(zz, centre)) <= radius * radius


def _lookalikes(rng, tpl: Template, img: np.ndarray, vent: np.ndarray) -> np.ndarray:
  """Adds bright tissue that is not WMH (label 0): the choroid plexus in the
  ventricles' atria, the septum pellucidum between them, CSF flow artefacts."""
  img = img.copy()
  mid = tpl.midline
  y0, y1 = tpl.vent_y_range
  x = np.arange(vent.shape[0])[:, None, None]
  y = np.arange(vent.shape[1])[None, :, None]
  atria = np.argwhere(vent & (y < y0 + 0.35 * (y1 - y0)) & (np.abs(x - mid) > 8))
  flow = np.argwhere(vent) if rng.uniform() < 0.5 else np.zeros((0, 3), int)
  spots = ([(atria, rng.uniform(2.0, 4.5), rng.uniform(0.7, 1.5))
            for _ in range(rng.integers(2, 5))] +
           [(flow, rng.uniform(1.5, 3.5), rng.uniform(0.5, 1.6))
            for _ in range(rng.integers(1, 4))])
  for cand, radius, value in spots:
    if len(cand):
      box, ball = _blob(cand[rng.integers(len(cand))], radius)
      img[box] = np.where(ball & vent[box], value, img[box])
  if rng.uniform() < 0.7:
    septum = vent & (np.abs(x - mid) <= 1)
    img[septum] = rng.uniform(0.8, 1.4)
  return img


def _mask_keeping_volume(fraction: np.ndarray) -> np.ndarray:
  """Thresholds a partial-volume lesion fraction so the mask keeps its volume.

  A fixed 0.5 threshold shrinks lesions that thick slices blur (a rim 2 mm
  thick on 5 mm slices never reaches 0.5); like an annotator marking every
  voxel mostly lesion, the threshold is lowered (to no less than 0.25) until the
  mask holds as many voxels as the fractions sum to.
  """
  want = int(round(float(fraction.sum())))
  values = fraction[fraction >= 0.25]
  if want == 0 or values.size <= want:
    return fraction >= 0.25
  return fraction >= min(_kth_largest(values, want), 0.5)


def _rotation(rx, ry, rz):
  cx, sx, cy, sy, cz, sz = (np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry),
                            np.cos(rz), np.sin(rz))
  rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rot_z @ rot_y @ rot_x


def sample_geometry(rng, site: str):
  """Voxel spacing, matrix and a voxel->world affine for one acquisition."""
  if site == 'Synth2D':       # 2-D FLAIR: fine in-plane, thick slices
    inplane, thick, fov_z = rng.uniform(0.4, 0.6), rng.uniform(5.0, 8.0), 130
  elif site == 'Synth3mm':    # the challenge's ~1x1x3 mm scans
    inplane, thick, fov_z = rng.uniform(0.85, 1.2), rng.uniform(2.5, 4.0), 145
  elif site == 'Synth3D':     # 3-D FLAIR, near isotropic
    inplane, thick, fov_z = rng.uniform(0.9, 1.2), rng.uniform(1.0, 1.5), 160
  else:
    raise ValueError(f'unknown synthetic site {site!r}')
  fov = rng.uniform(200, 250)
  shape = (int(round(fov / inplane)), int(round(fov * rng.uniform(0.9, 1.1)
                                                  / inplane)),
           int(round(fov_z * rng.uniform(0.9, 1.1) / thick)))
  spacing = np.array([inplane, inplane, thick])
  # Orientation: RAS, LPS, LAS, plus an oblique tilt of up to 12 degrees.
  flips = [np.diag([1, 1, 1]), np.diag([-1, -1, 1]), np.diag([-1, 1, 1])][
      rng.integers(3)]
  tilt = _rotation(*np.deg2rad(rng.uniform(-12, 12, 3) * [1, 0.5, 0.5]))
  lin = tilt @ flips @ np.diag(spacing)
  # The slab's centre: head coverage varies (thick-slice scans often start at
  # the skull base and may miss the vertex, or the reverse).
  center = np.array([0.0, -18.0, 10.0]) + rng.uniform(-8, 8, 3) * [1, 1, 1.8]
  affine = np.eye(4)
  affine[:3, :3] = lin
  affine[:3, 3] = center - lin @ ((np.array(shape) - 1) / 2)
  return shape, spacing, affine


@dataclasses.dataclass
class Subject:
  flair: np.ndarray
  labels: np.ndarray      # uint8 {0, 1, 2}
  affine: np.ndarray
  dtype: np.dtype
  lesion_ml: float        # requested lesion load
  brain: np.ndarray       # uint8 {0, 1}: the brain (with ventricles, cerebellum)


def other_pathology_labels(lesion: np.ndarray, other: np.ndarray) -> np.ndarray:
  """Label map as the challenge draws it: label 2 ("other pathology") dilated
  3x3x1 in-plane, label 1 (WMH) wins where the two overlap."""
  labels = np.zeros(lesion.shape, np.uint8)
  box = challenge_metrics.bounding_box(other, margin=1)
  if box is not None:   # dilated inside the bounding box of label 2: faster
    grown = ndimage.binary_dilation(other[box], structure=np.ones((3, 3, 1), bool))
    labels[box][grown] = 2
  labels[lesion] = 1
  return labels


def generate_subject(seed: int, index: int, site: str | None = None,
                     load_ml: float | None = None, geometry=None,
                     lacunes: bool | None = None) -> Subject:
  """One synthetic subject, a pure function of ``(seed, index)``.

  Args:
    seed: dataset seed.
    index: subject index; subjects of different (seed, index) are independent.
    site: acquisition family (one of SITES); by default ``SITES[index % 3]``.
    load_ml: lesion load; by default log-normal, median 8 mL, in [0.5, 80].
    geometry: optional ``(shape, spacing, affine)`` to override the random grid.
    lacunes: whether the subject has lacunes (label 2); by default in 35 %.
  """
  tpl = load_template()
  rng = np.random.default_rng([seed, index])
  site = site or SITES[index % len(SITES)]
  if load_ml is None:
    load_ml = float(np.clip(np.exp(rng.normal(np.log(8.0), 1.2)), 0.5, 80.0))
  shape, spacing, affine = geometry or sample_geometry(rng, site)

  # Anatomy on the template grid: ventricle enlargement (the template is a young
  # adult; WMH patients are old) turns periventricular tissue into CSF.
  grow = rng.uniform(0.0, 4.0)
  vent = tpl.dist_vent < grow
  wm = np.where(vent, 0.0, tpl.wm)
  gm = np.where(vent, 0.0, tpl.gm)
  csf = np.where(vent, 1.0, tpl.csf)
  # Subject pose and size (drawn first: the lesion load is asked of the template
  # divided by the head's volume scale, so the subject gets ``load_ml``).
  rot = _rotation(*np.deg2rad(rng.uniform(-8, 8, 3)))
  # The MNI152 brain is larger than most (~1.9 L with its CSF): scaled down a little.
  scale = rng.uniform(0.86, 1.02) * (1 + rng.uniform(-0.04, 0.04, 3))
  fine_noise = _smooth_noise(rng, wm.shape, 1.5, coarse=2)
  tpl_load = load_ml / float(np.prod(scale))
  # Their own stream: a subject without them is as in 3.2.0.
  below = inferior_lesions(np.random.default_rng([seed, index, 1]), tpl, tpl_load,
                           wm, vent, fine_noise)
  lining = ventricle_lining(np.random.default_rng([seed, index, 2]), tpl, grow, wm, gm,
                            tpl_load) & ~below
  les = lesion_map(rng, tpl, max(tpl_load - (below.sum() + lining.sum()) / 1000, 0.0),
                   grow, wm, fine_noise) | below | lining
  other = np.zeros_like(les)
  drawn = rng.uniform() < 0.35   # drawn even when `lacunes` is given
  if drawn if lacunes is None else lacunes:
    # Lacunes: cavities in deep grey/white matter.
    cand = np.argwhere((tpl.dist_vent > 4) & (tpl.dist_vent < 14) &
                       ((gm + wm) > 0.8) & ~les)
    for _ in range(rng.integers(1, 4)):
      box, ball = _blob(cand[rng.integers(len(cand))], rng.uniform(1.5, 3.0))
      other[box] |= ball

  # FLAIR contrasts relative to white matter, drawn per subject (SynthSeg's
  # idea): the cortex may be as bright as the lesions, and the sulcal CSF is
  # sometimes not fully suppressed.
  c_gm, c_csf = rng.uniform(1.05, 1.45), rng.uniform(0.02, 0.25)
  c_wmh = rng.uniform(1.3, 2.2)
  c_sulcal = c_csf if rng.uniform() < 0.75 else rng.uniform(0.3, 0.8)
  img = wm * 1.0 + gm * c_gm + csf * np.where(tpl.vent | vent, c_csf, c_sulcal)
  img *= 1 + 0.04 * fine_noise
  img = _lookalikes(rng, tpl, img, tpl.vent | vent)
  les_f = ndimage.gaussian_filter(les.astype(np.float32), 0.7)
  # Lesion brightness varies within and between lesions.
  img = img * (1 - les_f) + les_f * c_wmh * (1 + 0.1 * fine_noise)
  if other.any():
    rim = ndimage.binary_dilation(other, iterations=1) & ~other
    img = np.where(other, c_csf * 1.5, np.where(rim, np.maximum(img, c_gm * 1.1), img))
  # The head around the brain: stripped, whole or defaced, its own contrasts.
  coverage = head_lib.COVERAGE[rng.choice(len(head_lib.COVERAGE),
                                          p=head_lib.COVERAGE_P)]
  img = img + head_lib.draw(rng, tpl.head, _smooth_noise(rng, wm.shape, 10.0, 8),
                            fine_noise, c_csf, coverage)
  # Through-plane blur of thick slices (slice profile ~ Gaussian, FWHM = thickness).
  fwhm = spacing[2]
  if fwhm > 1.2:
    sig = fwhm / 2.355
    img = ndimage.gaussian_filter1d(img, sig, axis=2)
    les_f = ndimage.gaussian_filter1d(les.astype(np.float32), sig, axis=2)
  else:
    les_f = les.astype(np.float32)

  # Subject pose, size and a smooth elastic warp, world(subject) -> template voxel.
  pose = np.eye(4)
  pose[:3, :3] = rot @ np.diag(1 / scale)
  to_tpl = np.linalg.inv(tpl.affine) @ pose @ affine
  coarse = tuple(max(2, s // 16) for s in shape)
  warps = [_upsample(rng.standard_normal(coarse).astype(np.float32) * 1.5, shape)
           for _ in range(3)]
  flair, les_p, oth_p, brain_p = _resample(
      to_tpl.astype(np.float32), warps,
      [img, les_f, other.astype(np.float32), tpl.brain.astype(np.float32)])
  marked = challenge_metrics.drop_small_lesions(_mask_keeping_volume(les_p), spacing,
                                                MIN_MARKED_MM3)
  labels = other_pathology_labels(marked, oth_p >= 0.35)

  # Bias field (smooth, multiplicative) and Rician noise.
  u = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
  x, y, z = u[0][:, None, None], u[1][None, :, None], u[2][None, None, :]
  k = rng.uniform(-0.15, 0.15, 6)
  flair *= np.exp(k[0] * x + k[1] * y + k[2] * z + k[3] * x * x + k[4] * y * y +
                  k[5] * x * y)
  sigma = rng.uniform(0.01, 0.05)
  flair = np.sqrt((flair + sigma * rng.standard_normal(shape, np.float32)) ** 2 +
                  (sigma * rng.standard_normal(shape, np.float32)) ** 2)

  dtype = np.dtype([np.uint8, np.int16, np.float32][rng.integers(3)])
  top = {np.uint8: 250, np.int16: rng.uniform(500, 4000),
         np.float32: rng.uniform(0.5, 3000)}[dtype.type]
  flair = flair * (top / max(np.percentile(flair[::2, ::2], 99.9), 1e-6))
  if dtype != np.float32:
    flair = np.clip(np.round(flair), 0, np.iinfo(dtype).max)
  return Subject(flair.astype(dtype), labels, affine, dtype, load_ml,
                 (brain_p >= 0.5).astype(np.uint8))


def subject_id(seed: int, index: int) -> str:
  """Subject folder name: the seed is part of it, so datasets of two seeds never
  share a subject key."""
  return f'{seed}-{index:03d}'


def subject_folder(root, seed: int, index: int) -> Path:
  return Path(root) / SITES[index % len(SITES)] / subject_id(seed, index)


def write_one(root: str, seed: int, index: int) -> Path:
  """Generates and writes subject ``index`` (a process-pool work item)."""
  site = SITES[index % len(SITES)]
  folder = subject_folder(root, seed, index)
  s = generate_subject(seed, index, site)
  nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', s.flair, s.affine, dtype=s.dtype)
  nifti_io.save(folder / 'brain.nii.gz', s.brain, s.affine, dtype=np.uint8)
  # The mask last: its presence marks a complete subject.
  nifti_io.save(folder / 'wmh.nii.gz', s.labels, s.affine, dtype=np.uint8)
  return folder
