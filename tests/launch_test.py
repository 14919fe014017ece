"""The command line: exit codes and one-line errors."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config

ROOT = Path(__file__).resolve().parents[1]


def _launch(*args):
  return subprocess.run([sys.executable, str(ROOT / 'launch.py'),
                         '--config=' + str(ROOT / 'configs' / 'test.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        check=False)


def test_evaluate_without_checkpoint_fails_cleanly(tiny_dataset, tmp_path):
  r = _launch('--mode=evaluate', f'--workdir={tmp_path / "w"}',
              f'--config.data.root={tiny_dataset}', '--config.data.synthetic=False')
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'no checkpoint' in errors[0], r.stderr[-2000:]
  assert not (tmp_path / 'w' / 'eval').exists()


def test_missing_dataset_fails_cleanly(tmp_path):
  r = _launch('--mode=train', f'--workdir={tmp_path / "w"}',
              f'--config.data.root={tmp_path / "nothing"}',
              '--config.data.synthetic=False')
  assert r.returncode == 1
  assert f'error: {tmp_path / "nothing"}: dataset folder does not exist' in r.stderr


def test_unknown_config_key_is_refused(tmp_path):
  r = _launch(f'--workdir={tmp_path}', '--config.train.num_stepz=3')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f'error: --config.train.num_stepz: no such config key in '
      f'{ROOT / "configs" / "test.py"}; nearest valid keys: train.num_steps, '
      'refine.num_steps, train.warmup_steps']
  assert not tmp_path.joinpath('checkpoints').exists()


def test_config_paths_resolve_to_the_project_from_any_folder(tmp_path, monkeypatch):
  import launch  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'default.py').write_text('raise SystemExit("not this")\n')
  (tmp_path / 'configs' / 'mine.py').write_text('')
  (tmp_path / 'other.py').write_text('')
  resolve = launch.resolve_config_path
  # configs/NAME.py: the project's own, even with a configs/ folder here.
  assert resolve('configs/default.py') == str(ROOT / 'configs' / 'default.py')
  assert resolve('configs/test.py:arg') == f'{ROOT / "configs" / "test.py"}:arg'
  # Other relative paths: from the current folder first.
  assert resolve('configs/mine.py') == str(tmp_path / 'configs' / 'mine.py')
  assert resolve('other.py') == str(tmp_path / 'other.py')
  assert resolve('/abs/x.py') == '/abs/x.py' and resolve('none.py') == 'none.py'
  assert launch.resolve_config_argv(
      ['launch.py', '--config', 'configs/test.py', '--config.seed=1']) == [
          'launch.py', '--config', str(ROOT / 'configs' / 'test.py'), '--config.seed=1']


def test_init_from_a_run_before_input_norm_fine_tunes_it_with_one_pass(tmp_path):
  import launch  # pylint: disable=g-import-not-at-top
  from wmh_jax import run_record  # pylint: disable=g-import-not-at-top
  before = test_config.get_config()
  del before.data['input_norm']   # its config.json predates the key
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'config.json').write_text(run_record.config_to_json(before))
  config = test_config.get_config()
  config.train.init_from = str(tmp_path / 'src')
  assert config.data.input_norm == 'brain'
  launch.inherit_network(config, ['launch.py'])
  assert config.data.input_norm == 'head'
  config.data.input_norm = 'brain'   # named on the command line: kept
  launch.inherit_network(config, ['launch.py', '--config.data.input_norm=brain'])
  assert config.data.input_norm == 'brain'


def test_a_fine_tune_config_older_than_a_frozen_key_takes_the_source_value(tmp_path):
  """A config.json written before data.grid_max_depth, used as the fine-tune's
  config, gets the source run's value added (it raised a KeyError)."""
  import launch  # pylint: disable=g-import-not-at-top
  from wmh_jax import run_record  # pylint: disable=g-import-not-at-top
  source = test_config.get_config()
  source.data.grid_max_depth = 24
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'config.json').write_text(run_record.config_to_json(source))
  config = test_config.get_config()
  del config.data['grid_max_depth']
  config.train.init_from = str(tmp_path / 'src')
  config.lock()   # as the --config flag gives it
  launch.inherit_network(config, ['launch.py'])
  assert config.data.grid_max_depth == 24
  assert run_record.first_frozen_change(source, config) is None


def test_predict_on_a_run_without_config_json_takes_the_network_of_its_time(tmp_path):
  import launch  # pylint: disable=g-import-not-at-top
  old, new, empty = tmp_path / 'old', tmp_path / 'new', tmp_path / 'empty'
  (old / 'checkpoints').mkdir(parents=True)
  (new / 'checkpoints').mkdir(parents=True)
  (new / 'config.json').write_text('{}')
  empty.mkdir()
  def argv(w, *more):
    return launch.trained_config_argv(['launch.py', '--mode=predict', f'--workdir={w}', *more])
  # Trained before config.json was written: the seed's network, configs/seed_width.py.
  assert argv(old) == ['launch.py', f'--config={ROOT / "configs" / "seed_width.py"}',
                       '--mode=predict', f'--workdir={old}']
  assert argv(new)[1] == f'--config={ROOT / "configs" / "trained.py"}:{new / "config.json"}'
  # Nothing trained there, or a config named: argv as given.
  assert argv(empty) == ['launch.py', '--mode=predict', f'--workdir={empty}']
  assert argv(old, '--config=configs/test.py')[1:] == [
      '--mode=predict', f'--workdir={old}', '--config=configs/test.py']
  # Training is not redirected.
  assert launch.trained_config_argv(['launch.py', '--mode=train', f'--workdir={old}']) == [
      'launch.py', '--mode=train', f'--workdir={old}']


def test_launch_runs_from_another_folder(tmp_path):
  # score: the cheapest mode (no JAX). A configs/default.py in the current folder
  # is not the project's and must not run.
  from wmh_jax import nifti_io  # pylint: disable=g-import-not-at-top
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'default.py').write_text('raise SystemExit("not this")\n')
  labels = np.zeros((8, 8, 4), np.uint8)
  labels[2:5, 2:5, 1:3] = 1
  nifti_io.save(tmp_path / 'gt' / 'Utrecht' / '0' / 'wmh.nii.gz', labels, np.eye(4),
                dtype=np.uint8)
  nifti_io.save(tmp_path / 'pred' / '0_wmh.nii.gz', labels, np.eye(4), dtype=np.uint8)
  for k, config in enumerate([[], ['--config=configs/test.py']]):
    r = subprocess.run([sys.executable, str(ROOT / 'launch.py'), *config, '--mode=score',
                        '--gt=gt', '--pred=pred', f'--output=out{k}'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / f'out{k}' / 'scores.csv').exists()


@pytest.fixture(scope='module')
def tiny_run(tiny_dataset, tmp_path_factory):
  """``(config, workdir)`` of a 2-step run of configs/test.py with a test split."""
  from wmh_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('tiny_run')
  cfg = test_config.for_dataset(tiny_dataset, num_steps=2, eval_every_steps=100)
  cfg.data.test_fraction = 0.25
  cfg.refine.enabled = False
  train.train_and_evaluate(cfg, workdir)
  return cfg, workdir


def _launch_here(cwd, *args):
  return subprocess.run([sys.executable, str(ROOT / 'launch.py'), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=300,
                        check=False)


def test_predict_needs_only_the_workdir_from_any_folder(tiny_run, tiny_dataset,
                                                        tmp_path):
  # Trained with configs/test.py; no --config here: the run's own config.json
  # (the default config's network would not fit its checkpoint).
  _, workdir = tiny_run
  flair = tiny_dataset / 'Utrecht' / '1' / 'pre' / 'FLAIR.nii.gz'
  r = _launch_here(tmp_path, '--mode=predict', f'--workdir={workdir}',
                   f'--input={flair}', '--output=out', '--config.predict.overlays=False',
                   '--config.predict.threshold=0.3',
                   f'--compilation_cache={tmp_path / "jax_cache"}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / 'out' / 'FLAIR_wmh.nii.gz').is_file()
  assert not (tmp_path / 'out' / 'FLAIR_overlay.png').exists()  # the override applied
  # predict keeps its compiled programs for the next cold start
  assert any(p.is_file() for p in (tmp_path / 'jax_cache').rglob('*'))


def test_a_run_trained_before_keys_were_removed_still_predicts(tiny_run, tiny_dataset,
                                                               tmp_path):
  # Its config.json holds evaluate.threshold and the sliding-window keys:
  # dropped on load, and an override naming one is refused like any unknown key.
  _, workdir = tiny_run
  old = tmp_path / 'old_run'
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns('eval*'))
  saved = json.loads((old / 'config.json').read_text())
  saved['evaluate']['threshold'] = 0.5
  saved['predict'].update(method='resize', spacing=[1.0, 1.0, 3.0], window=None,
                          overlap=0.5)
  (old / 'config.json').write_text(json.dumps(saved, indent=1))
  flair = tiny_dataset / 'Utrecht' / '1' / 'pre' / 'FLAIR.nii.gz'
  common = ['--mode=predict', f'--workdir={old}', f'--input={flair}',
            '--config.predict.overlays=False', f'--compilation_cache={tmp_path / "c"}']
  r = _launch_here(tmp_path, *common, '--output=refused', '--config.evaluate.threshold=0.3')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f'error: --config.evaluate.threshold: no such config key in '
      f'{ROOT / "configs" / "trained.py"}:{old / "config.json"}; nearest valid keys: '
      'refine.thresholds, predict.threshold, refine.threshold_rule']
  assert not (tmp_path / 'refused').exists()
  r = _launch_here(tmp_path, *common, '--output=out')
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / 'out' / 'FLAIR_wmh.nii.gz').is_file()


def test_a_trained_network_cannot_change_refused_naming_the_key(tiny_run, tiny_dataset,
                                                                tmp_path):
  _, workdir = tiny_run
  flair = tiny_dataset / 'Utrecht' / '1' / 'pre' / 'FLAIR.nii.gz'
  common = ['--mode=predict', f'--workdir={workdir}', f'--input={flair}',
            f'--output={tmp_path / "out"}']
  r = _launch_here(tmp_path, *common, '--config.model.decoder_filters=(8,8)')
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      f'error: --config.model.decoder_filters: {workdir} was trained with (4, 8), '
      "not (8, 8); a trained model's architecture and preprocessing cannot change")
  r = _launch_here(tmp_path, *common, '--config=configs/default.py')
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(
      f'error: --config={ROOT / "configs" / "default.py"}: data.grid: {workdir} was '
      'trained with (32, 32, 8), not (128, 128, 16)')
  assert not (tmp_path / 'out').exists()


def test_evaluate_reports_validation_and_test_apart(tiny_run, tmp_path):
  _, workdir = tiny_run
  split = json.loads((workdir / 'split.json').read_text())
  assert split['test'] and split['val'] and split['test_fraction'] == 0.25
  r = _launch_here(tmp_path, '--mode=evaluate', f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith('evaluate ')]
  assert [l.split(' (')[0] for l in lines] == ['evaluate development', 'evaluate test']
  for folder, name in (('eval', 'val'), ('eval_test', 'test')):
    rows = list(csv.DictReader(open(workdir / folder / 'metrics.csv')))
    assert [r['subject'] for r in rows] == [e['key'] for e in split[name]]
  # The same run evaluated on another split: refused, naming the subject.
  r = _launch_here(tmp_path, '--mode=evaluate', f'--workdir={workdir}', '--overwrite',
                   '--config.data.split_seed=3')
  assert r.returncode == 1
  assert 'not the split this run was trained on: subject ' in r.stderr.splitlines()[-1]


def test_ctrl_c_ends_with_one_line_and_exit_130(monkeypatch, capsys):
  import launch  # pylint: disable=import-outside-toplevel

  def interrupted(config):
    raise KeyboardInterrupt
  monkeypatch.setattr(launch, '_run', interrupted)
  monkeypatch.setattr(launch, 'FLAGS', type('Flags', (), {'config': None})())
  with pytest.raises(SystemExit) as stop:
    launch.main(['launch.py'])
  assert stop.value.code == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('interrupted: the files written so far are whole')
