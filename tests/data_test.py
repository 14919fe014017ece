"""A run's dataset: the separate validation folder and the synthetic folders' marker."""

import json
from pathlib import Path
import shutil

import numpy as np
import pytest

from conftest import write_tiny_subject
from configs import test as test_config
from wmh_jax import data
from wmh_jax import run_record
from wmh_jax import synthetic


def test_separate_validation_root_must_not_share_a_subject(tiny_dataset, tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  val_root = tmp_path / 'val'
  shutil.copytree(tiny_dataset / 'Utrecht', val_root / 'Utrecht')
  cfg.data.val_root = str(val_root)
  with pytest.raises(ValueError, match=r'Utrecht/0, Utrecht/1, Utrecht/2'):
    data.load_splits(cfg, tmp_path / 'run')
  shutil.rmtree(val_root / 'Utrecht')
  shutil.copytree(tiny_dataset / 'Utrecht', val_root / 'Leiden')
  train, val = data.load_splits(cfg, tmp_path / 'run')
  assert len(train) == 9 and [p['key'] for p in val] == [
      'Leiden/0', 'Leiden/1', 'Leiden/2']


def test_synthetic_folder_of_another_seed_or_version_is_refused(tmp_path):
  folder = tmp_path / 'synthetic'
  data._check_marker(folder, 3, synthetic.GENERATOR_VERSION)  # pylint: disable=protected-access
  marker = json.loads((folder / 'synthetic.json').read_text())
  assert marker == {'generator_version': synthetic.GENERATOR_VERSION, 'seed': 3}
  data._check_marker(folder, 3, synthetic.GENERATOR_VERSION)  # same: accepted
  with pytest.raises(ValueError, match='synthetic.json'):
    data._check_marker(folder, 4, synthetic.GENERATOR_VERSION)
  with pytest.raises(ValueError, match='synthetic.json'):
    data._check_marker(folder, 3, '0.9')
  old = tmp_path / 'old'
  (old / 'Synth2D' / '000').mkdir(parents=True)
  (old / 'Synth2D' / '000' / 'wmh.nii.gz').write_bytes(b'')
  with pytest.raises(ValueError, match='no synthetic.json'):
    data._check_marker(old, 3, synthetic.GENERATOR_VERSION)


def test_a_file_in_two_splits_is_refused_by_its_resolved_path(tiny_dataset, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(tiny_dataset, root)
  cfg = test_config.for_dataset(root)
  cfg.data.val_root = str(root / 'Utrecht')   # inside data.root: other names, same files
  flair = root / 'Utrecht' / '0' / 'pre' / 'FLAIR.nii.gz'
  with pytest.raises(ValueError) as e:
    data.find_splits(cfg)
  assert str(e.value) == (f'{flair}: in train (as Utrecht/0) and in val (as ./0); a '
                          'subject must be in one split only')
  (tmp_path / 'val').mkdir()
  (tmp_path / 'val' / 'Leiden').symlink_to(root / 'Singapore')   # a link
  cfg.data.val_root = str(tmp_path / 'val')
  with pytest.raises(ValueError, match=r'Singapore/0/pre/FLAIR.nii.gz: in train \(as '
                     r'Singapore/0\) and in val \(as Leiden/0\)'):
    data.find_splits(cfg)


def test_test_fraction_holds_out_a_third_split_of_the_folder(tiny_dataset, tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  cfg.data.test_fraction = 0.25
  sets, record = data.load_run_data(cfg, tmp_path / 'run')
  keys = {n: [p['key'] for p in sets[n]] for n in ('train', 'val', 'test')}
  assert keys['test'] and keys['val'] and keys['train']
  assert sum(map(len, keys.values())) == 9 == len(set(sum(keys.values(), [])))
  assert [e['key'] for e in record['test']] == keys['test']
  train, val = data.load_splits(cfg, tmp_path / 'run')
  assert [p['key'] for p in train] == keys['train'] and [p['key'] for p in val] == keys['val']


def test_cached_subjects_name_their_flair_as_this_process_finds_it(
    tiny_dataset, tmp_path, monkeypatch):
  """Prepared from a relative data.root in one folder and read back from the
  cache in another, a subject's ``source`` is the FLAIR this process can open
  (the refiner and evaluate read it), not the name cached from the first."""
  shutil.copytree(tiny_dataset, tmp_path / 'here' / 'data')
  monkeypatch.chdir(tmp_path / 'here')
  first = data.load_split(test_config.for_dataset('data'), 'run', 'val')
  assert not Path(first[0]['source']).is_absolute()
  monkeypatch.chdir(tmp_path)
  cfg = test_config.for_dataset(tmp_path / 'here' / 'data')
  again = data.load_split(cfg, tmp_path / 'here' / 'run', 'val')
  assert [p['key'] for p in again] == [p['key'] for p in first]
  for p in again:
    assert Path(p['source']).is_file()
    assert p['source'] == str(tmp_path / 'here' / 'data' / p['key'] / 'pre' /
                              'FLAIR.nii.gz')


def test_long_config_trains_the_default_on_more_of_its_subjects():
  from configs import default, long  # pylint: disable=g-import-not-at-top
  d, l = default.get_config(), long.get_config()
  # The same network, loss, refiner and held-out subjects: only more training
  # subjects (a superset: same folder and seed) and more steps.
  for part in ('model', 'loss', 'augment', 'refine', 'predict'):
    assert l[part].to_dict() == d[part].to_dict(), part
  ld, dd = l.data.to_dict(), d.data.to_dict()
  assert ld.pop('num_subjects') > dd.pop('num_subjects') and ld == dd
  lt, dt = l.train.to_dict(), d.train.to_dict()
  assert lt.pop('num_steps') > dt.pop('num_steps')
  for key in ('warmup_steps', 'eval_every_steps'):  # scaled with the steps
    del lt[key], dt[key]
  assert lt == dt  # the same learning rate, crops, batch, decay


def test_a_synthetic_folder_is_extended_not_remade(tmp_path, monkeypatch):
  # A folder the default made (here 1 subject) serves a config asking for more
  # (configs/long.py): its subjects are kept as they are and the missing added.
  # A coarse fixed grid (~10-20 s for the two subjects on 2 cores, the
  # template's own grid dominating); one subject a call runs in this process
  # (so the patched grid holds).
  geo = ((40, 48, 36), np.full(3, 4.0),
         np.array([[4.0, 0, 0, -80], [0, 4, 0, -110], [0, 0, 4, -60], [0, 0, 0, 1]]))
  monkeypatch.setattr(synthetic, 'sample_geometry', lambda rng, site: geo)
  cfg = test_config.get_config()
  cfg.data.root = str(tmp_path / 'synthetic')
  cfg.data.num_subjects = 1
  data.ensure_synthetic(cfg)
  first = synthetic.subject_folder(cfg.data.root, cfg.data.synthetic_seed, 0)
  before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in first.rglob('*.nii.gz')}
  assert len(before) == 3
  cfg.data.num_subjects = 2
  data.ensure_synthetic(cfg)
  assert {f: (f.stat().st_mtime_ns, f.read_bytes())
          for f in first.rglob('*.nii.gz')} == before
  second = synthetic.subject_folder(cfg.data.root, cfg.data.synthetic_seed, 1)
  assert sorted(f.name for f in second.rglob('*.nii.gz')) == [
      'FLAIR.nii.gz', 'brain.nii.gz', 'wmh.nii.gz']
  # (that a subject is the same whichever run writes it: synthetic_test)


def test_a_synthetic_run_takes_its_configured_subjects_of_an_extended_folder(tmp_path):
  # configs/long.py extends the main job's folder. The main job's config (its
  # num_subjects of each folder, by generator index) still picks its own subjects:
  # its run folder evaluates, and a new main job trains on what it always did.
  cfg = test_config.get_config()
  cfg.data.synthetic = True
  rng = np.random.default_rng(0)
  folders = {'root': (tmp_path / 'train', cfg.data.synthetic_seed, 5),
             'val_root': (tmp_path / 'val', cfg.data.val_synthetic_seed, 3),
             'test_root': (tmp_path / 'test', cfg.data.test_synthetic_seed, 3)}
  for name, (folder, seed, n) in folders.items():
    data._check_marker(folder, seed, synthetic.GENERATOR_VERSION)  # pylint: disable=protected-access
    for i in range(n):  # tiny stand-ins where the generator writes subject i
      write_tiny_subject(synthetic.subject_folder(folder, seed, i), rng, shape=(16, 16, 6))
    cfg.data[name] = str(folder)
  cfg.data.num_subjects, cfg.data.num_val_subjects, cfg.data.num_test_subjects = 2, 1, 2
  files = data.find_splits(cfg)   # nothing generated: the configured ones are there
  key = lambda folder, seed, i: synthetic.subject_folder(folder, seed, i).relative_to(
      folder).as_posix()
  want = {n: sorted(key(f, s, i) for i in range(k)) for n, (f, s, k) in
          (('train', (tmp_path / 'train', cfg.data.synthetic_seed, 2)),
           ('val', (tmp_path / 'val', cfg.data.val_synthetic_seed, 1)),
           ('test', (tmp_path / 'test', cfg.data.test_synthetic_seed, 2)))}
  assert {n: sorted(s.key for s in v) for n, v in files.items()} == want
  run_record.record(tmp_path / 'run', cfg, run_record.split_record(cfg, files))
  data.load_run_data(cfg, tmp_path / 'run', ('val',))   # the recorded split: accepted
  cfg.data.num_subjects = 5                              # more of them: another run
  assert len(data.find_splits(cfg)['train']) == 5
  with pytest.raises(ValueError, match='not the split this run was trained on'):
    data.load_run_data(cfg, tmp_path / 'run', ('val',))
  cfg.data.synthetic = False       # a folder of the user's own scans: every subject
  assert len(data.find_splits(cfg)['val']) == 3
  cfg.data.synthetic = True        # a configured subject that lost its FLAIR
  flair = synthetic.subject_folder(tmp_path / 'val', cfg.data.val_synthetic_seed, 0
                                   ) / 'pre' / 'FLAIR.nii.gz'
  flair.unlink()
  with pytest.raises(ValueError, match=f'{flair.parent.parent}: a synthetic subject '
                     r'the config asks for is incomplete \(1 of 1\)'):
    data.find_splits(cfg)
