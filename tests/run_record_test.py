"""A run folder that knows what made it: config.json, split.json and
environment.json."""

import json
import logging
import os
from pathlib import Path
import shutil
import subprocess

import numpy as np
import pytest

from configs import default as default_config
from configs import test as test_config
from configs import trained as trained_config
from conftest import write_tiny_subject
from wmh_jax import atomic_write
from wmh_jax import data
from wmh_jax import machine
from wmh_jax import run_record
from wmh_jax import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('get_config', [default_config.get_config,
                                        test_config.get_config])
def test_config_json_round_trips_with_its_tuples(get_config, tmp_path):
  config = get_config()
  atomic_write.write(tmp_path / 'config.json', run_record.config_to_json(config))
  back = run_record.load_config(tmp_path)
  assert back.to_dict() == config.to_dict()
  assert isinstance(back.data.grid, tuple) and back.data.grid == config.data.grid
  assert back.model.encoder_filters == config.model.encoder_filters
  assert isinstance(back.model.encoder_filters[0], tuple)
  assert isinstance(back.train.learning_rate, float)
  assert run_record.load_config(tmp_path / 'none') is None


def _old_style(config, **old) -> dict:
  """``config`` as a config.json written before OBSOLETE's keys were removed."""
  saved = json.loads(run_record.config_to_json(config))
  for key, value in {'evaluate.threshold': 0.5, 'predict.method': 'resize',
                     'predict.spacing': [1.0, 1.0, 3.0], 'predict.window': None,
                     'predict.overlap': 0.5, **old}.items():
    section, name = key.split('.')
    saved[section][name] = value
  return saved


def test_an_old_config_json_loads_without_the_removed_keys(tmp_path, caplog):
  config = test_config.get_config()
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(_old_style(config), indent=1))
  with caplog.at_level(logging.WARNING, logger='absl'):
    back = run_record.load_config(tmp_path)
    from_file = trained_config.get_config(str(path))   # predict's, evaluate's base
  assert back.to_dict() == config.to_dict()
  assert from_file.to_dict() == config.to_dict()
  assert not caplog.text   # nothing the run did differs from what applies now
  # Values that made the old run differ are said, in one line each.
  path.write_text(json.dumps(_old_style(config, **{'evaluate.threshold': 0.4,
                                                   'predict.method': 'sliding_window'})))
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert run_record.load_config(tmp_path).to_dict() == config.to_dict()
  assert (f'{path}: evaluate.threshold=0.4 is no longer a config key; evaluate '
          'uses predict.threshold=0.5') in caplog.text
  assert (f"{path}: predict.method='sliding_window' is no longer a config key; "
          'predict resizes every scan to data.grid') in caplog.text


def test_network_keys_are_frozen_others_may_change():
  trained = test_config.get_config()
  config = trained.copy_and_resolve_references()
  config.predict.threshold = 0.9
  config.refine.thresholds = (0.5,)
  config.model.conv_impl = 'native'   # the same parameters, computed another way
  config.train.num_steps = 99
  assert run_record.first_frozen_change(trained, config) is None
  config.model.encoder_filters = ((4, 4), (8, 16))
  with pytest.raises(run_record.RunRecordError) as e:
    run_record.check_same_network(trained, config, 'W')
  assert str(e.value) == (
      "--config.model.encoder_filters: W was trained with ((4, 8), (8, 16)), not "
      "((4, 4), (8, 16)); a trained model's architecture and preprocessing cannot "
      'change')
  config = trained.copy_and_resolve_references()
  config.data.grid = (64, 64, 8)
  assert run_record.first_frozen_change(trained, config)[0] == 'data.grid'
  # What the network was trained to see: the input's normalisation. A config
  # written before the key is a one-pass ('head') run; brain_norm_fraction is
  # how training mixed them, not what the trained network takes.
  config = trained.copy_and_resolve_references()
  config.data.brain_norm_fraction = 0.9
  assert run_record.first_frozen_change(trained, config) is None
  before = trained.copy_and_resolve_references()
  del before.data['input_norm']
  assert trained.data.input_norm == 'brain'
  assert run_record.first_frozen_change(before, trained) == (
      'data.input_norm', 'head', 'brain')
  config.data.input_norm = 'head'
  assert run_record.first_frozen_change(before, config) is None
  with pytest.raises(run_record.RunRecordError, match=r'^--config.data.input_norm: '
                     "W was trained with 'head', not 'brain'"):
    run_record.check_same_network(before, trained, 'W')


def _record_only(config, workdir):
  """config.json and split.json of a run that stops before its first step."""
  config.train.num_steps = 0
  config.refine.enabled = False
  train.train_and_evaluate(config, workdir)


def test_training_records_config_and_split_before_the_first_step(tiny_dataset,
                                                                 tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  _record_only(cfg, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any(
      p.name.isdigit() for p in (tmp_path / 'run' / 'checkpoints').iterdir())
  assert run_record.load_config(tmp_path / 'run').to_dict() == cfg.to_dict()
  split = json.loads((tmp_path / 'run' / 'split.json').read_text())
  assert split['split_seed'] == 0 and split['val_fraction'] == 0.34
  files = data.find_splits(cfg)
  for name in ('train', 'val', 'test'):
    assert [e['key'] for e in split[name]] == [s.key for s in files[name]]
  e = split['val'][0]
  s = files['val'][0]
  assert e['flair'] == run_record.sha256(s.flair) and e['wmh'] == run_record.sha256(s.wmh)
  assert len(e['flair']) == 64 and split['test'] == []


def test_sha256_reads_each_version_of_a_file_once(tmp_path, monkeypatch):
  import hashlib  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'FLAIR.nii.gz'
  path.write_bytes(b'a' * 1000)
  reads, real = [], hashlib.sha256
  def counting(*args):
    reads.append(path)
    return real(*args)
  monkeypatch.setattr(run_record.hashlib, 'sha256', counting)
  first = run_record.sha256(path)
  assert first == real(b'a' * 1000).hexdigest()
  assert run_record.sha256(str(path)) == first and len(reads) == 1  # not read again
  # Rewritten in place with the same size: another version, read and hashed again.
  stat = path.stat()
  path.write_bytes(b'b' * 1000)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
  assert run_record.sha256(path) == real(b'b' * 1000).hexdigest()
  assert len(reads) == 2


def test_resume_or_evaluate_on_another_split_is_refused_naming_the_subject(
    tiny_dataset, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(tiny_dataset, root)
  cfg = test_config.for_dataset(root)
  _record_only(cfg, tmp_path / 'run')
  before = (tmp_path / 'run' / 'split.json').read_text()
  data.load_split(cfg, tmp_path / 'run', 'val')  # the same split: accepted
  # Another split seed (the README's old way to refit the refiner moved
  # trained-on subjects into validation).
  other = cfg.copy_and_resolve_references()
  other.data.split_seed = 1
  with pytest.raises(run_record.RunRecordError) as e:
    data.load_split(other, tmp_path / 'run', 'val')
  msg = str(e.value)
  assert msg.startswith(f'{tmp_path / "run" / "split.json"}: not the split this run '
                        'was trained on: subject ')
  assert 'split seed 0 recorded, 1 now' in msg and '\n' not in msg
  with pytest.raises(run_record.RunRecordError, match='split seed 0 recorded, 1 now'):
    _record_only(other, tmp_path / 'run')
  # A subject lost: named.
  shutil.rmtree(root / 'Utrecht' / '2')
  with pytest.raises(run_record.RunRecordError,
                     match=r'subject Utrecht/2 was in \w+, is now in no split'):
    data.load_split(cfg, tmp_path / 'run', 'val')
  shutil.copytree(tiny_dataset / 'Utrecht' / '2', root / 'Utrecht' / '2')
  # A file whose content changed: named by its path.
  flair = root / 'Singapore' / '1' / 'pre' / 'FLAIR.nii.gz'
  write_tiny_subject(flair.parent.parent, np.random.default_rng(9))
  with pytest.raises(run_record.RunRecordError) as e:
    _record_only(cfg, tmp_path / 'run')
  assert str(e.value).endswith(f'subject Singapore/1: {flair} changed since training '
                               '(sha256 differs)')
  assert (tmp_path / 'run' / 'split.json').read_text() == before  # never rewritten


def test_resume_with_another_architecture_is_refused_naming_the_key(tiny_dataset,
                                                                    tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  _record_only(cfg, tmp_path / 'run')
  cfg.model.decoder_filters = (8, 8)
  with pytest.raises(run_record.RunRecordError,
                     match=r'^--config.model.decoder_filters: .* was trained with '
                     r'\(4, 8\), not \(8, 8\)'):
    _record_only(cfg, tmp_path / 'run')


def test_the_saved_config_finds_relative_data_folders_from_any_folder(
    tiny_dataset, tmp_path, monkeypatch):
  from configs import trained  # pylint: disable=g-import-not-at-top
  shutil.copytree(tiny_dataset, tmp_path / 'here' / 'data')
  monkeypatch.chdir(tmp_path / 'here')
  cfg = test_config.for_dataset('data')
  _record_only(cfg, 'run')
  monkeypatch.chdir(tmp_path)
  back = trained.get_config(str(tmp_path / 'here' / 'run' / 'config.json'))
  assert back.data.root == str(tmp_path / 'here' / 'data')
  assert back.data.tfds_dir == str(tmp_path / 'here' / 'data' / 'tfds') or (
      back.data.tfds_dir == str(tmp_path / 'here' / cfg.data.tfds_dir))
  data.load_split(back, tmp_path / 'here' / 'run', 'val')  # the recorded split


def _head(root):
  """What git itself says ROOT's commit is (None: not a checkout, no git, or a
  checkout git refuses to read, e.g. one owned by another user)."""
  try:
    top = subprocess.run(['git', 'rev-parse', '--show-toplevel'], cwd=root, text=True,
                         capture_output=True, check=True).stdout.strip()
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head if Path(top).resolve() == Path(root).resolve() else None


def test_each_training_start_records_where_and_with_what_it_ran(tiny_dataset,
                                                                tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  cfg = test_config.for_dataset(tiny_dataset)
  _record_only(cfg, tmp_path / 'run')
  _record_only(cfg, tmp_path / 'run')   # a resumed start adds its own entry
  runs = json.loads((tmp_path / 'run' / 'environment.json').read_text())['runs']
  assert len(runs) == 2 and runs[0]['started_utc'] <= runs[1]['started_utc']
  for e in runs:
    assert e['start_step'] == 0 and e['num_steps'] == 0 and 'init_from' not in e
    assert e['packages']['jax'] == jax.__version__
    assert e['packages']['numpy'] == np.__version__
    assert e['backend'] == jax.default_backend() == 'cpu'
    assert e['device_count'] == jax.device_count()
    assert e['cpu_cores'] >= 1 and e['python'].count('.') == 2
    assert e['code'].get('commit') == _head(ROOT)   # None: git cannot read ROOT
    if e['code']:
      assert isinstance(e['code']['modified'], bool)


@pytest.mark.parametrize('content', [b'{"runs": [tr', b'[]', b'{}', b'{"runs": 1}',
                                     b'\xff\xfe'])
def test_an_unreadable_environment_record_is_kept_and_training_goes_on(
    content, tiny_dataset, tmp_path, caplog):
  cfg = test_config.for_dataset(tiny_dataset)
  path = tmp_path / 'run' / 'environment.json'
  path.parent.mkdir()
  path.write_bytes(content)
  cfg.train.num_steps = 0
  cfg.refine.enabled = False
  with caplog.at_level(logging.WARNING, logger='absl'):
    state = train.train_and_evaluate(cfg, tmp_path / 'run')
  assert int(state.step) == 0
  assert path.read_bytes() == content
  assert f'{path}: not a readable environment record' in caplog.text


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_code_revision_is_the_checkouts_commit_and_says_when_files_changed(tmp_path):
  assert machine.code_revision(tmp_path) == {}   # not a checkout
  git = lambda *a: subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t',
                                   '-c', 'commit.gpgsign=false', *a], cwd=tmp_path,
                                  check=True, capture_output=True,
                                  text=True).stdout.strip()
  git('init', '-q')
  (tmp_path / 'a.py').write_text('x = 1\n')
  git('add', 'a.py')
  git('commit', '-q', '-m', 'one')
  head = git('rev-parse', 'HEAD')
  assert machine.code_revision(tmp_path) == {'commit': head, 'modified': False}
  (tmp_path / 'new.py').write_text('')   # untracked: not a change to the code run
  assert machine.code_revision(tmp_path) == {'commit': head, 'modified': False}
  (tmp_path / 'a.py').write_text('x = 2\n')
  assert machine.code_revision(tmp_path) == {'commit': head, 'modified': True}
  (tmp_path / 'sub').mkdir()   # inside a checkout, but not its top: not this code's
  assert machine.code_revision(tmp_path / 'sub') == {}


def test_the_environment_record_keeps_the_variables_that_move_numbers_only(
    monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  monkeypatch.setenv('JAX_ENABLE_X64', '1')
  monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', '0')
  monkeypatch.setenv('TF_TOKEN_app_terraform_io', 'secret')   # Terraform's, not ours
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'secret')
  env = machine.environment()['env']
  assert env['XLA_FLAGS'] == '--xla_cpu_enable_fast_math=false'
  assert env['JAX_ENABLE_X64'] == '1' and env['TF_ENABLE_ONEDNN_OPTS'] == '0'
  assert 'secret' not in env.values()


def test_a_failing_environment_record_does_not_stop_training(tiny_dataset, tmp_path,
                                                             monkeypatch, caplog):
  def broken():
    raise RuntimeError('no /proc here')
  monkeypatch.setattr(machine, 'environment', broken)
  cfg = test_config.for_dataset(tiny_dataset)
  cfg.train.num_steps = 0
  cfg.refine.enabled = False
  with caplog.at_level(logging.WARNING, logger='absl'):
    state = train.train_and_evaluate(cfg, tmp_path / 'run')
  assert int(state.step) == 0
  assert not (tmp_path / 'run' / 'environment.json').exists()
  assert 'this start is not recorded (RuntimeError: no /proc here)' in caplog.text
