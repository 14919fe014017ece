import types

import numpy as np
import pytest
from scipy import ndimage

from conftest import NO_BRAIN
from conftest import write_tiny_subject
from configs import test as test_config
from wmh_jax import nifti_io
from wmh_jax import subjects


def test_find_subjects_nested_sites(tiny_dataset):
  found = subjects.find_subjects(tiny_dataset)
  assert len(found) == 9
  assert {s.site for s in found} == {'Utrecht', 'Singapore', 'Amsterdam/GE3T'}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_split_is_by_subject(tiny_dataset, seed):
  found = subjects.find_subjects(tiny_dataset)
  train, val, test = subjects.split_subjects(found, 0.34, seed)
  keys_t, keys_v = {s.key for s in train}, {s.key for s in val}
  assert not keys_t & keys_v and not test
  assert keys_t | keys_v == {s.key for s in found}
  assert val and train
  again = subjects.split_subjects(found, 0.34, seed)
  assert [s.key for s in again[1]] == [s.key for s in val]  # deterministic
  # Each subject is placed by the hash of (split seed, key) alone (none below
  # 0.34 for seed 1: the smallest then).
  u = {s.key: subjects.split_unit(seed, s.key) for s in found}
  assert keys_v == ({k for k in u if u[k] < 0.34} or {min(u, key=u.get)})


def _items(keys):
  return [types.SimpleNamespace(key=k, site=k.rsplit('/', 1)[0]) for k in keys]


def test_adding_or_losing_a_subject_moves_no_other():
  keys = [f'{site}/{i}' for site in ('A', 'B', 'C/x') for i in range(20)]
  def placed(items, **kw):
    return {s.key: name for name, split in zip(('train', 'val', 'test'),
                                               subjects.split_subjects(items, 0.2, 5, **kw))
            for s in split}
  full = placed(_items(keys), test_fraction=0.2)
  assert set(full.values()) == {'train', 'val', 'test'}
  for gone in ('A/3', 'B/0', 'C/x/19'):
    fewer = placed(_items([k for k in keys if k != gone]), test_fraction=0.2)
    assert fewer == {k: v for k, v in full.items() if k != gone}
  more = placed(_items(keys + ['A/new']), test_fraction=0.2)
  assert {k: v for k, v in more.items() if k != 'A/new'} == full
  # Another split seed is another split; the test set does not depend on
  # how validation is chosen.
  assert placed(_items(keys), test_fraction=0.2) != {
      s.key: n for n, split in zip(('train', 'val', 'test'), subjects.split_subjects(
          _items(keys), 0.2, 6, test_fraction=0.2)) for s in split}
  by_site = placed(_items(keys), test_fraction=0.2, val_sites=('B',))
  assert {k for k, v in by_site.items() if v == 'test'} == {
      k for k, v in full.items() if v == 'test'}
  assert {k for k, v in by_site.items() if v == 'val'} == {
      k for k, v in full.items() if v != 'test' and k.startswith('B/')}


def test_tiny_split_still_has_a_validation_and_a_test_subject():
  items = _items(['A/0', 'A/1', 'A/2'])
  u = {s.key: subjects.split_unit(0, s.key) for s in items}
  train, val, test = subjects.split_subjects(items, 0.01, 0, test_fraction=0.01)
  assert [s.key for s in val] == [min(u, key=u.get)]
  assert [s.key for s in test] == [max(u, key=u.get)]
  assert len(train) == 1
  train, val, test = subjects.split_subjects(items, 0.0, 0)  # none asked: none
  assert len(train) == 3 and not val and not test
  with pytest.raises(ValueError, match='test_fraction=0.6'):
    subjects.split_subjects(items, 0.5, 0, test_fraction=0.6)


def test_val_ids_naming_a_test_subject_is_refused():
  items = _items([f'A/{i}' for i in range(30)])
  *_, test = subjects.split_subjects(items, 0.2, 0, test_fraction=0.2)
  with pytest.raises(ValueError, match=f'data.val_ids: {test[0].key} is a test subject'):
    subjects.split_subjects(items, 0.2, 0, test_fraction=0.2, val_ids=(test[0].key,))


def test_find_subjects_follows_symlinked_site_and_root_folders(tiny_dataset, tmp_path):
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'Utrecht').symlink_to(tiny_dataset / 'Utrecht')
  (tmp_path / 'data' / 'Singapore').symlink_to(tiny_dataset / 'Singapore')
  (tmp_path / 'data' / 'Singapore' / 'loop').symlink_to(tmp_path / 'data')
  found = subjects.find_subjects(tmp_path / 'data')
  assert [s.key for s in found] == [f'{site}/{i}' for site in ('Singapore', 'Utrecht')
                                    for i in range(3)]
  assert found[0].flair == tmp_path / 'data' / 'Singapore' / '0' / 'pre' / 'FLAIR.nii.gz'
  (tmp_path / 'data' / 'Singapore' / 'loop').unlink()
  (tmp_path / 'link').symlink_to(tiny_dataset)
  assert [s.key for s in subjects.find_subjects(tmp_path / 'link')] == [
      s.key for s in subjects.find_subjects(tiny_dataset)]


def test_missing_mask_skipped_or_refused(tmp_path):
  rng = np.random.default_rng(0)
  write_tiny_subject(tmp_path / 'A' / '1', rng)
  write_tiny_subject(tmp_path / 'A' / '2', rng, with_mask=False)
  assert [s.key for s in subjects.find_subjects(tmp_path)] == ['A/1']
  with pytest.raises(FileNotFoundError, match='A/2'):
    subjects.find_subjects(tmp_path, missing_mask='error')
  with pytest.raises(FileNotFoundError, match='no subjects'):
    subjects.find_subjects(tmp_path / 'A' / '1' / 'pre')


def test_prepare_resizes_and_zscores(tiny_dataset):
  s = subjects.find_subjects(tiny_dataset)[0]
  p = subjects.prepare_subject(s, (32, 32, 8))
  assert p['image'].shape == (32, 32, 8) and p['labels'].shape == (32, 32, 8)
  assert set(np.unique(p['labels'])) <= {0, 1, 2}
  assert (p['labels'] == 1).any()
  mask = subjects.head_mask(nifti_io.load_image(s.flair)[0])
  assert 0.2 < mask.mean() < 0.8
  np.testing.assert_allclose(p['spacing'], [1.2, 1.2, 3.0])


def test_resize_back_inverts_geometry():
  vol = np.zeros((40, 36, 12), np.float32)
  vol[10:20, 8:30, 3:9] = 1
  small = subjects.resize(vol, (20, 18, 6))
  back = subjects.resize_back(small, vol.shape) >= 0.5
  assert back.shape == vol.shape
  assert 2 * (back & (vol > 0)).sum() / (back.sum() + vol.sum()) > 0.9


def test_leave_site_out_split(tiny_dataset):
  found = subjects.find_subjects(tiny_dataset)
  train, val, _ = subjects.split_subjects(found, 0.34, 0, val_sites=('Amsterdam/GE3T',))
  assert {s.site for s in val} == {'Amsterdam/GE3T'} and len(val) == 3
  assert {s.site for s in train} == {'Utrecht', 'Singapore'} and len(train) == 6
  with pytest.raises(ValueError, match='Leiden'):
    subjects.split_subjects(found, 0.34, 0, val_sites=('Leiden',))


def test_prepare_loads_the_brain_mask_when_there(tiny_dataset):
  found = {s.key: s for s in subjects.find_subjects(tiny_dataset)}
  s = found['Utrecht/0']
  assert s.brain == tiny_dataset / 'Utrecht' / '0' / 'brain.nii.gz'
  p = subjects.prepare_subject(s, (32, 32, 8))
  native = nifti_io.load_brain(s.brain)
  np.testing.assert_array_equal(p['native_brain'], native)
  frac = p['brain_fraction']
  assert frac.shape == (32, 32, 8) and frac.dtype == np.float32
  assert 0.0 <= frac.min() and frac.max() <= 1.0
  assert 0.0 < frac.mean() < 1.0
  assert abs(frac.mean() - native.mean()) < 0.02          # the same share of the volume
  # Lesions (label 1 on the grid) lie inside the brain.
  assert (frac[p['labels'] == 1] > 0.5).all()
  # The input z-scored in that brain (data.input_norm='brain'): mean 0 and sd 1
  # over the brain, not over the head as 'image' is.
  image, _ = nifti_io.load_image(s.flair)
  z = subjects.zscore(image, s.flair, native == 1)
  assert abs(z[native == 1].mean()) < 1e-4 and abs(z[native == 1].std() - 1) < 1e-4
  np.testing.assert_allclose(p['image_brain'], subjects.resize(z, (32, 32, 8)),
                             rtol=1e-6, atol=1e-5)   # rescored from 'image'
  np.testing.assert_array_equal(p['image'], subjects.preprocess(image, (32, 32, 8)))
  assert np.abs(p['image_brain'] - p['image']).max() > 1e-2   # another mask's statistics
  # No brain.nii.gz: no brain keys (the loss ignores the brain channel then).
  assert found[NO_BRAIN].brain is None
  p = subjects.prepare_subject(found[NO_BRAIN], (32, 32, 8))
  assert not {'brain_fraction', 'native_brain', 'image_brain'} & set(p)


def test_input_norm_is_head_for_an_old_config_and_refuses_another():
  cfg = test_config.get_config()
  assert subjects.input_norm(cfg.data) == cfg.data.input_norm in subjects.INPUT_NORMS
  del cfg.data['input_norm']   # a run's config.json from before the key
  assert subjects.input_norm(cfg.data) == 'head'
  cfg.data.input_norm = 'skull'
  with pytest.raises(ValueError, match=r"data.input_norm: 'skull' is not one of"):
    subjects.input_norm(cfg.data)
  # The share of training crops z-scored in the brain: 0.5 before the key.
  assert subjects.brain_norm_fraction(cfg.data) == cfg.data.brain_norm_fraction
  del cfg.data['brain_norm_fraction']
  assert subjects.brain_norm_fraction(cfg.data) == 0.5
  for bad in (-0.1, 1.5):
    cfg.data.brain_norm_fraction = bad
    with pytest.raises(ValueError, match=rf'data.brain_norm_fraction: {bad} is not in'):
      subjects.brain_norm_fraction(cfg.data)


@pytest.mark.parametrize('case', ['shape', 'affine', 'values', 'fraction'])
def test_bad_brain_mask_is_refused_with_one_line_naming_the_file(case, tmp_path):
  folder = tmp_path / 'A' / '1'
  image, _ = write_tiny_subject(folder, np.random.default_rng(0), with_brain=True)
  affine = np.diag([1.2, 1.2, 3.0, 1.0])
  brain = np.asarray(nifti_io.load_brain(folder / 'brain.nii.gz'))
  path = folder / 'brain.nii.gz'
  data, message = {
      'shape': (brain[:, :, :-1], 'brain mask shape (40, 36, 11) differs from the '
                'image shape (40, 36, 12)'),
      'affine': (brain, 'brain mask affine differs from the image affine'),
      'values': (brain * 2, 'brain mask must be in {0, 1}, found [2]'),
      'fraction': (brain * 0.5, 'brain mask must be integers in {0, 1}'),
  }[case]
  nifti_io.save(path, data, np.diag([1.0, 1.2, 3.0, 1.0]) if case == 'affine' else affine)
  s = subjects.find_subjects(tmp_path)[0]
  with pytest.raises(nifti_io.NiftiError) as e:
    subjects.prepare_subject(s, (16, 16, 4))
  assert str(e.value) == f'{path}: {message}'
  assert '\n' not in str(e.value)
  assert image.shape == (40, 36, 12)


def test_zscore_in_the_brain_ignores_what_lies_outside_it():
  """With the brain mask, the brain's z-scores are the same whether the scan
  shows a bright scalp or not; without it, the scalp moves them."""
  rng = np.random.default_rng(0)
  brain = np.zeros((24, 24, 8), bool)
  brain[6:18, 6:18, 2:6] = True
  stripped = np.where(brain, rng.uniform(0.8, 1.2, brain.shape), 0.0)
  skull_on = stripped.copy()
  skull_on[0:5, :, :] = 3.0                      # scalp fat, 3x the brain
  a = subjects.zscore(stripped, mask=brain)
  b = subjects.zscore(skull_on, mask=brain)
  np.testing.assert_allclose(a[brain], b[brain], atol=1e-5)
  assert abs(a[brain].mean()) < 1e-5 and abs(a[brain].std() - 1) < 1e-4
  assert not np.allclose(subjects.zscore(stripped)[brain],
                         subjects.zscore(skull_on)[brain], atol=1e-2)


def test_rescore_is_preprocess_in_another_mask_without_a_second_resize():
  """The grid image z-scored in the brain, from the head's grid image and the
  two masks' statistics, equals preprocessing the scan with the brain mask (to
  float32 rounding); a brain under 64 voxels takes the head's statistics, as
  zscore does, and a constant brain is refused as zscore refuses it."""
  rng = np.random.default_rng(3)
  image = rng.gamma(2.0, 300.0, (40, 36, 12))
  image[:4] = 4000.0                             # a bright scalp
  brain = np.zeros(image.shape, bool)
  brain[8:30, 8:28, 2:10] = True
  grid_image = subjects.preprocess(image, (16, 16, 4))
  head = subjects.zscore_stats(image)
  got = subjects.rescore(grid_image, head, subjects.zscore_stats(image, mask=brain))
  want = subjects.preprocess(image, (16, 16, 4), mask=brain)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  assert np.abs(got - grid_image).max() > 0.1    # the brain's statistics, not the head's
  tiny = np.zeros_like(brain)
  tiny[10:13, 10:13, 4:6] = True                 # 18 voxels
  np.testing.assert_array_equal(
      subjects.rescore(grid_image, head, subjects.zscore_stats(image, mask=tiny)),
      subjects.preprocess(image, (16, 16, 4), mask=tiny))
  flat = np.where(brain, 5.0, image)
  with pytest.raises(nifti_io.NiftiError, match='scan.nii.gz: image is constant'):
    subjects.zscore_stats(flat, 'scan.nii.gz', brain)


def test_a_subject_folder_given_as_the_root_is_that_subject(tmp_path):
  # predict --input=ID/: this raised IndexError (the folder has no SITE/ID below it).
  write_tiny_subject(tmp_path / 'Utrecht' / '7', np.random.default_rng(0))
  found = subjects.find_subjects(tmp_path / 'Utrecht' / '7', missing_mask='keep')
  assert [(s.site, s.id, s.key) for s in found] == [('.', '7', './7')]


@pytest.mark.parametrize('seed', range(4))
def test_fill_holes_is_scipys_in_3d_and_slice_by_slice(seed):
  """One labelling of the background gives what ndimage.binary_fill_holes
  gives, on the whole volume and on each axial slice alone: random blobs with
  a hole of each kind (closed in 3-D; closed only within its slices), and
  thin arrays (an axis of 1 or 2 voxels)."""
  rng = np.random.default_rng(seed)
  shape = tuple(int(n) for n in rng.integers(15, 24, 3))
  mask = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.5
  mask[1:7, 1:7, 1:7] = True          # a hollow cube: a hole in 3-D
  mask[2:6, 2:6, 2:6] = False
  mask[8:14, 1:7, :] = True           # a tube along z: holes in its slices only
  mask[9:13, 2:6, :] = False
  filled_3d = ndimage.binary_fill_holes(mask)
  per_slice = np.stack([ndimage.binary_fill_holes(mask[:, :, z])
                        for z in range(shape[2])], axis=2)
  assert (filled_3d & ~mask).any() and (per_slice & ~filled_3d).any()
  np.testing.assert_array_equal(subjects.fill_holes(mask), filled_3d)
  np.testing.assert_array_equal(subjects.fill_holes(mask, in_plane=True), per_slice)
  for thin in (mask[:, :, :1], mask[:, :2], mask[:1]):
    np.testing.assert_array_equal(subjects.fill_holes(thin),
                                  ndimage.binary_fill_holes(thin))


def test_fill_holes_fills_a_tube_slice_by_slice_and_not_in_3d():
  """A tube along z: every slice is a ring (its inside a hole), while in 3-D
  its inside reaches the top and bottom faces (no hole)."""
  x, y = np.ogrid[:11, :11]
  r2 = (x - 5) ** 2 + (y - 5) ** 2
  ring = (r2 <= 16) & (r2 >= 4)
  tube = np.repeat(ring[:, :, None], 5, axis=2)
  np.testing.assert_array_equal(subjects.fill_holes(tube), tube)
  np.testing.assert_array_equal(subjects.fill_holes(tube, in_plane=True),
                                np.repeat((r2 <= 16)[:, :, None], 5, axis=2))
  assert subjects.fill_holes(np.ones((3, 3, 3), bool)).all()
  assert not subjects.fill_holes(np.zeros((3, 3, 3), bool)).any()
