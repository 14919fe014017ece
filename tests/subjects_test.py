import numpy as np
import pytest

from conftest import write_tiny_subject
from wmh_jax import nifti_io
from wmh_jax import subjects


def test_find_subjects_nested_sites(tiny_dataset):
  found = subjects.find_subjects(tiny_dataset)
  assert len(found) == 9
  assert {s.site for s in found} == {'Utrecht', 'Singapore', 'Amsterdam/GE3T'}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_split_is_by_subject(tiny_dataset, seed):
  found = subjects.find_subjects(tiny_dataset)
  train, val = subjects.split_subjects(found, 0.34, seed)
  keys_t, keys_v = {s.key for s in train}, {s.key for s in val}
  assert not keys_t & keys_v
  assert keys_t | keys_v == {s.key for s in found}
  assert {s.site for s in val} == {s.site for s in found}  # every site held out
  again = subjects.split_subjects(found, 0.34, seed)
  assert [s.key for s in again[1]] == [s.key for s in val]  # deterministic


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
  train, val = subjects.split_subjects(found, 0.34, 0, val_sites=('Amsterdam/GE3T',))
  assert {s.site for s in val} == {'Amsterdam/GE3T'} and len(val) == 3
  assert {s.site for s in train} == {'Utrecht', 'Singapore'} and len(train) == 6
  with pytest.raises(ValueError, match='Leiden'):
    subjects.split_subjects(found, 0.34, 0, val_sites=('Leiden',))
