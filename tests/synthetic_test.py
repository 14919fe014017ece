import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from wmh_jax import challenge_metrics as cm
from wmh_jax import nifti_io
from wmh_jax import synthetic


def _iso_geometry():
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [-80, -110, -60]
  return (160, 190, 150), np.ones(3), affine


def test_same_seed_identical_files(tmp_path):
  a = synthetic.write_one(str(tmp_path / 'a'), 5, 1)
  b = synthetic.write_one(str(tmp_path / 'b'), 5, 1)
  for name in ('pre/FLAIR.nii.gz', 'brain.nii.gz', 'wmh.nii.gz'):
    # The decompressed bytes: header and voxels, everything but gzip's timestamp.
    assert gzip.decompress((a / name).read_bytes()) == gzip.decompress(
        (b / name).read_bytes()), name


def _coarse_geometry():
  """A fixed 4 mm grid over the head: every subject on the same grid, so that
  images and labels compare voxel by voxel (and fast: ~1 s a subject)."""
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  affine[:3, 3] = [-80, -110, -60]
  return (40, 48, 36), np.full(3, 4.0), affine


def test_same_seed_same_subject_other_seed_or_index_another():
  geo = _coarse_geometry()
  a = synthetic.generate_subject(5, 1, geometry=geo)
  again = synthetic.generate_subject(5, 1, geometry=geo)
  np.testing.assert_array_equal(again.flair, a.flair)
  np.testing.assert_array_equal(again.labels, a.labels)
  np.testing.assert_array_equal(again.brain, a.brain)
  assert (a.labels == 1).sum() > 0
  for other in (synthetic.generate_subject(6, 1, geometry=geo),   # another seed
                synthetic.generate_subject(5, 2, geometry=geo)):  # another index
    assert other.flair.shape == a.flair.shape == geo[0]
    assert not np.array_equal(other.flair.astype(np.float32),
                              a.flair.astype(np.float32))
    assert not np.array_equal(other.labels, a.labels)


@pytest.mark.parametrize('load_ml,geometry', [
    (2.0, 'iso'), (20.0, 'iso'), (8.0, 'Synth3mm'), (30.0, 'Synth2D')])
def test_lesion_volume_matches_requested_load(load_ml, geometry):
  geo = _iso_geometry() if geometry == 'iso' else synthetic.sample_geometry(
      np.random.default_rng(1), geometry)
  s = synthetic.generate_subject(0, 3, load_ml=load_ml, geometry=geo)
  got = (s.labels == 1).sum() * np.prod(geo[1]) / 1000.0
  assert abs(got - load_ml) / load_ml <= 0.10, (got, load_ml)


def test_lesions_under_3_mm_are_drawn_but_not_marked(monkeypatch):
  """wmh.nii.gz marks lesions from 3 mm across (MIN_MARKED_MM3), as raters do;
  the smaller foci stay in the FLAIR, which is the same with or without the rule."""
  smallest = synthetic.MIN_MARKED_MM3
  assert 14.0 < smallest < 14.2                         # a ball 3 mm across
  geo = synthetic.sample_geometry(np.random.default_rng(1), 'Synth3mm')
  voxel = float(np.prod(geo[1]))                        # ~1 x 1 x 3 mm
  s = synthetic.generate_subject(0, 3, load_ml=2.0, geometry=geo)
  monkeypatch.setattr(synthetic, 'MIN_MARKED_MM3', 0.0)
  every = synthetic.generate_subject(0, 3, load_ml=2.0, geometry=geo)
  np.testing.assert_array_equal(s.flair, every.flair)
  marked, drawn = s.labels == 1, every.labels == 1
  cc, n = cm.lesions(drawn)
  size = np.bincount(cc.ravel(), minlength=n + 1)[1:] * voxel
  small = 1 + np.flatnonzero(size < smallest)
  assert 0 < small.size < n                             # some foci are too small
  np.testing.assert_array_equal(marked, drawn & ~np.isin(cc, small))
  assert (np.bincount(cm.lesions(marked)[0].ravel())[1:] * voxel >= smallest).all()


def test_inferior_lesions_lie_below_the_ventricles_in_half_the_subjects():
  """Generator 3.3.0: a subject's lesions below the lateral ventricles' floor
  (temporal lobes, brainstem, cerebellum) are in white matter, a share of the
  load; a draw >= 0.5 gives none (the subject is as in 3.2.0)."""
  tpl = synthetic.load_template()
  rough = np.zeros(tpl.wm.shape, np.float32)
  floor = int(np.nonzero(tpl.vent.any(axis=(0, 1)))[0].min())
  assert np.random.default_rng(0).uniform() >= 0.5
  assert not synthetic.inferior_lesions(np.random.default_rng(0), tpl, 8.0, tpl.wm,
                                        tpl.vent, rough).any()
  assert np.random.default_rng(2).uniform() < 0.5
  les = synthetic.inferior_lesions(np.random.default_rng(2), tpl, 8.0, tpl.wm,
                                   tpl.vent, rough)
  assert les.any() and not les[:, :, floor:].any()
  world_z = (tpl.affine @ np.c_[np.argwhere(les), np.ones(les.sum())].T)[2]
  assert world_z.max() < -2.5                   # MNI mm: below the ventricles
  assert (tpl.wm[les] > 0.5).all() and not tpl.vent[les].any()
  # U(0.05, 0.3) of 8 mL on 1 mm voxels; the last lesion may overshoot by one
  # ball (radius <= 4 mm stretched <= 1.6: < 1.1 mL).
  assert 0.4 <= les.sum() / 1000 <= 2.4 + 1.1
  assert cm.lesions(les)[1] > 1                           # several small lesions


def test_ventricle_lining_is_a_thin_band_along_the_ventricles_in_half_the_subjects():
  """Generator 3.4.0: a lining abutting the lateral ventricles, a share of the
  load, off the midline; a draw >= 0.5 gives none (the subject is as in 3.3.0)."""
  tpl = synthetic.load_template()
  grow = 2.0
  vent = tpl.dist_vent < grow
  wm, gm = np.where(vent, 0.0, tpl.wm), np.where(vent, 0.0, tpl.gm)
  dist = np.maximum(tpl.dist_vent - grow, 0.0)
  tissue = (wm + gm) > 0.3
  lining = lambda seed: synthetic.ventricle_lining(np.random.default_rng(seed), tpl,
                                                   grow, wm, gm, 8.0)
  assert np.random.default_rng(0).uniform() >= 0.5
  assert not lining(0).any()
  assert np.random.default_rng(2).uniform() < 0.5
  les = lining(2)
  assert 0.1 * 8000 - 1 <= les.sum() <= 0.3 * 8000 + 1    # its share of 8 mL
  assert not (les & vent).any() and tissue[les].all()
  assert dist[les].max() <= 3.5                           # thin
  assert (dist[les] <= 1.0).mean() > 0.2                  # against the CSF
  assert not les[synthetic.near_midline(tpl)].any()      # not the septum
  on_wall = (dist > 0) & (dist <= 1.0) & tissue
  on_wall[synthetic.near_midline(tpl)] = False
  assert (les & on_wall).sum() < on_wall.sum()            # part of the wall
  # Another seed lines other stretches.
  other = lining(3)
  assert np.random.default_rng(3).uniform() < 0.5 and other.any()
  assert (les & other).sum() < 0.8 * min(les.sum(), other.sum())


def test_subject_with_a_lining_keeps_its_load(monkeypatch):
  """A subject drawn with a lining has the load asked for (the lining is a share
  of it), and its lesions are not those of the same subject without one."""
  geo = _iso_geometry()
  index = next(i for i in range(20)
               if np.random.default_rng([0, i, 2]).uniform() < 0.5)
  s = synthetic.generate_subject(0, index, load_ml=4.0, geometry=geo)
  got = (s.labels == 1).sum() * np.prod(geo[1]) / 1000.0
  assert abs(got - 4.0) / 4.0 <= 0.10, got
  monkeypatch.setattr(synthetic, 'ventricle_lining',
                      lambda rng, tpl, grow, wm, *a: np.zeros(wm.shape, bool))
  without = synthetic.generate_subject(0, index, load_ml=4.0, geometry=geo)
  assert not np.array_equal(without.labels, s.labels)


def test_other_pathology_dilated_in_plane_and_lesion_wins():
  lesion = np.zeros((9, 9, 3), bool)
  other = np.zeros_like(lesion)
  other[4, 4, 1] = True
  lesion[5, 4, 1] = True
  labels = synthetic.other_pathology_labels(lesion, other)
  assert labels[5, 4, 1] == 1                       # label 1 wins the overlap
  assert (labels[3:6, 3:6, 1] > 0).all()            # 3x3 in-plane
  assert (labels[:, :, 0] == 0).all() and (labels[:, :, 2] == 0).all()  # x1
  assert (labels == 2).sum() == 8


def test_generated_label_two_follows_the_challenge_rules():
  s = synthetic.generate_subject(0, 7, load_ml=10.0, geometry=_iso_geometry(),
                                 lacunes=True)
  two, any_label = s.labels == 2, s.labels > 0
  assert two.any()
  # Every label-2 voxel lies in a 3x3x1 window inside the labelled voxels (a
  # dilation by that window is open under it), and none in a lesion.
  opened = ndimage.binary_opening(any_label, structure=np.ones((3, 3, 1), bool))
  assert opened[two].all()
  without = synthetic.generate_subject(0, 7, load_ml=10.0, geometry=_iso_geometry(),
                                       lacunes=False)
  assert not (without.labels == 2).any()


def test_lesions_inside_the_brain_and_brighter_than_its_median():
  s = synthetic.generate_subject(0, 4, load_ml=10.0, geometry=_iso_geometry())
  flair, brain = s.flair.astype(np.float32), s.brain.astype(bool)
  assert s.brain.dtype == np.uint8 and s.brain.shape == s.flair.shape
  assert brain[s.labels == 1].all()
  assert 900 < brain.sum() / 1000 < 2300          # mL: a whole brain
  assert np.median(flair[s.labels == 1]) > np.median(flair[brain & (s.labels == 0)])


def test_heads_vary_and_fat_sometimes_outshines_the_lesions():
  """Whole, defaced and stripped heads occur; in some subject the tissue
  outside the brain is brighter than the median lesion (so "brightest = lesion"
  is false), in another it is absent (skull-stripped)."""
  brighter = stripped = False
  for i in range(8):
    s = synthetic.generate_subject(1, i, load_ml=5.0, geometry=_iso_geometry())
    flair, brain = s.flair.astype(np.float32), s.brain.astype(bool)
    outside = flair[~brain & (ndimage.distance_transform_edt(~brain) > 4)]
    lesion = np.median(flair[s.labels == 1])
    brighter |= np.percentile(outside, 99.5) > lesion
    stripped |= np.percentile(outside, 99.5) < 0.1 * lesion
  assert brighter and stripped


@pytest.mark.parametrize('site', synthetic.SITES)
def test_every_random_geometry_writes_a_valid_nifti(tmp_path, site):
  rng = np.random.default_rng(3)
  seen_codes = set()
  for k, dtype in enumerate([np.uint8, np.int16, np.float32] * 2):
    shape, spacing, affine = synthetic.sample_geometry(rng, site)
    data = (np.arange(np.prod(shape)) % 200).reshape(shape).astype(dtype)
    path = nifti_io.save(tmp_path / f'{k}.nii.gz', data, affine, dtype=dtype)
    img = nib.load(str(path))
    hdr = img.header
    assert img.shape == shape
    assert hdr.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(hdr.get_zooms(), spacing, rtol=1e-5)
    np.testing.assert_allclose(hdr.get_sform(), affine, atol=1e-4)
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-4)
    assert int(hdr['sform_code']) > 0 and int(hdr['qform_code']) > 0
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    seen_codes.add(nib.aff2axcodes(affine))
  assert len(seen_codes) >= 2   # more than one orientation drawn


def test_default_subjects_cover_the_three_acquisitions():
  got = {}
  for i, site in enumerate(synthetic.SITES):
    s = synthetic.generate_subject(11, i)
    spacing = np.sqrt((s.affine[:3, :3] ** 2).sum(0))
    got[site] = (s.flair.shape, spacing)
    assert s.labels.shape == s.flair.shape and s.labels.dtype == np.uint8
  assert got['Synth2D'][1][0] < 0.65 and got['Synth2D'][1][2] >= 5
  assert 2.5 <= got['Synth3mm'][1][2] <= 4
  assert got['Synth3D'][1][2] <= 1.5
