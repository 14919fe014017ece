"""The TFDS builders, prepared from tiny folders the tests write."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import write_tiny_subject
from wmh_jax import datasets
from wmh_jax import nifti_io
from wmh_jax import subjects

GRID = (16, 16, 4)


def _keys(split):
  return [d['key'] for d in split]


def test_challenge_builder_splits_by_subject_and_keeps_site_and_spacing(
    tiny_dataset, tmp_path):
  train, val = datasets.load_prepared_splits(
      'wmh_challenge', GRID, tmp_path / 'tfds', manual_dir=tiny_dataset)
  found = subjects.find_subjects(tiny_dataset)
  assert sorted(_keys(train) + _keys(val)) == sorted(s.key for s in found)
  assert not set(_keys(train)) & set(_keys(val))
  # The default builder config's split: subjects.split_subjects(0.2, seed 0).
  _, want_val, _ = subjects.split_subjects(found, 0.2, 0)
  assert _keys(val) == [s.key for s in want_val]
  files = {s.key: s for s in found}
  for d in train + val:
    assert d['image'].shape == GRID and d['image'].dtype == np.float32
    assert d['labels'].shape == GRID
    assert d['key'] == f'{d["site"]}/{d["id"]}'
    image, affine = nifti_io.load_image(files[d['key']].flair)
    np.testing.assert_array_equal(
        d['native_labels'], nifti_io.load_labels(files[d['key']].wmh, affine))
    np.testing.assert_allclose(d['affine'], affine)
    np.testing.assert_allclose(d['spacing'], [1.2, 1.2, 3.0], rtol=1e-6)
    assert tuple(d['native_shape']) == image.shape


def test_challenge_leave_one_site_out(tiny_dataset, tmp_path):
  train, val = datasets.load_prepared_splits(
      'wmh_challenge', GRID, tmp_path / 'tfds', manual_dir=tiny_dataset,
      val_sites=('Singapore',))
  assert {d['site'] for d in val} == {'Singapore'} and len(val) == 3
  assert 'Singapore' not in {d['site'] for d in train} and len(train) == 6
  with pytest.raises(ValueError, match='Leiden'):
    datasets.load_prepared_splits('wmh_challenge', GRID, tmp_path / 'tfds',
                                  manual_dir=tiny_dataset, val_sites=('Leiden',))


def test_challenge_test_split_and_no_t1_config(tmp_path):
  rng = np.random.default_rng(4)
  root = tmp_path / 'download'
  for part, site, ids in (('training', 'Utrecht', '012'), ('training', 'Singapore', '345'),
                          ('test', 'Amsterdam/GE1T5', '67')):
    for i in ids:
      folder = root / part / site / i
      write_tiny_subject(folder, rng)
  builder = datasets.make_builder('wmh_challenge', GRID, tmp_path / 'tfds')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root)))
  assert set(builder.info.splits) == {'train', 'validation', 'test'}
  test = datasets.loading.as_prepared(builder, 'test')
  assert _keys(test) == ['Amsterdam/GE1T5/6', 'Amsterdam/GE1T5/7']
  assert 't1' not in test[0] and test[0]['image'].shape == GRID
  # The T1 config is gone: nothing trained or evaluated on its T1.
  with pytest.raises(ValueError, match="no config 'flair_t1'"):
    datasets.make_builder('wmh_challenge/flair_t1', GRID, tmp_path / 'tfds')


def test_challenge_empty_manual_dir_says_where_to_put_the_files(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='SITE/ID/pre/FLAIR.nii.gz') as e:
    datasets.load_prepared_splits('wmh_challenge', GRID, tmp_path / 'tfds',
                                  manual_dir=tmp_path / 'empty')
  assert str(tmp_path / 'empty') in str(e.value)
  with pytest.raises(ValueError, match="no config 'flair_dwi'"):
    datasets.make_builder('wmh_challenge/flair_dwi', GRID, tmp_path / 'tfds')


def test_synthetic_builder_validation_from_an_unseen_seed(tmp_path):
  kw = dict(num_train=2, num_validation=1, seed=7, val_seed=8)
  train, val = datasets.load_prepared_splits('wmh_synthetic', GRID, tmp_path / 'a', **kw)
  assert _keys(train) == ['Synth2D/7-000', 'Synth3mm/7-001']
  assert _keys(val) == ['Synth2D/8-000']
  # Deterministic: a second build elsewhere gives the same examples.
  again, _ = datasets.load_prepared_splits('wmh_synthetic', GRID, tmp_path / 'b', **kw)
  for d, e in zip(train, again):
    for k in ('image', 'labels', 'native_labels', 'affine'):
      np.testing.assert_array_equal(d[k], e[k])
  assert (train[0]['native_labels'] == 1).any()


def test_main_job_trains_and_evaluates_from_the_tfds_builder(tiny_dataset, tmp_path):
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  from wmh_jax import evaluate  # pylint: disable=import-outside-toplevel
  from wmh_jax import train  # pylint: disable=import-outside-toplevel
  cfg = test_config.for_dataset(tiny_dataset, num_steps=6)
  cfg.data.tfds = 'wmh_challenge'
  cfg.data.tfds_dir = str(tmp_path / 'tfds')
  state = train.train_and_evaluate(cfg, tmp_path / 'run')
  assert int(state.step) == 6
  assert not (tmp_path / 'run' / 'prepared').exists()  # TFDS did the decoding
  summary = evaluate.evaluate(cfg, tmp_path / 'run')
  _, val = datasets.load_prepared_splits(
      'wmh_challenge', cfg.data.grid, cfg.data.tfds_dir, manual_dir=tiny_dataset,
      split_seed=0, val_fraction=cfg.data.val_fraction, test_fraction=0.0)
  assert summary['subjects'] == len(val) >= 2
  for d in val:
    pred = nib.load(str(tmp_path / 'run' / 'eval' / 'pred' /
                        f'{d["key"].replace("/", "_")}_wmh.nii.gz'))
    assert pred.shape == tuple(d['native_shape'])
    np.testing.assert_allclose(pred.affine, d['affine'], atol=1e-5)


@pytest.mark.parametrize('split_seed,test_fraction', [(0, 0.0), (3, 0.25)])
def test_tfds_and_folder_splits_agree(tiny_dataset, tmp_path, split_seed, test_fraction):
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  from wmh_jax import data  # pylint: disable=import-outside-toplevel
  cfg = test_config.for_dataset(tiny_dataset)
  cfg.data.split_seed, cfg.data.test_fraction = split_seed, test_fraction
  cfg.data.grid = GRID
  folder = data.find_splits(cfg)
  cfg.data.tfds, cfg.data.tfds_dir = 'wmh_challenge', str(tmp_path / 'tfds')
  tfds_sets, record = data.load_run_data(cfg, tmp_path / 'run')
  for name in ('train', 'val', 'test'):
    assert _keys(tfds_sets[name]) == [s.key for s in folder[name]], name
    assert [e['key'] for e in record[name]] == [s.key for s in folder[name]]
  assert bool(folder['test']) == (test_fraction > 0)
  # The split is in the prepared dataset's name: other values, another dataset.
  built = sorted(p.name for p in (tmp_path / 'tfds' / 'wmh_challenge').iterdir()
                 if not p.name.startswith('.'))
  assert len(built) == 1 and f'split_seed{split_seed}' in built[0]
  assert f'test_fraction{test_fraction}' in built[0] and 'val_fraction0.34' in built[0]
