"""Faults: a checkpoint that is broken or holds NaN, and any exception, reach the
user as one ``error:`` line; training falls back to the previous good checkpoint."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bad_input_test import run_launch
from configs import test as test_config
import launch
from wmh_jax import checkpoints
from wmh_jax import steps
from wmh_jax import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
  """``(config, workdir)`` of a 4-step run: checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('faults')
  cfg = test_config.for_dataset(tiny_dataset, num_steps=4, checkpoint_every_steps=2,
                                eval_every_steps=100)
  cfg.refine.enabled = False  # not needed here
  train.train_and_evaluate(cfg, workdir)
  return cfg, workdir


def _copy(trained, tmp_path) -> Path:
  return Path(shutil.copytree(trained[1], tmp_path / 'w'))


def _truncate_latest(workdir: Path) -> None:
  """Cuts every data file of step 4 to 1000 bytes (a disk that filled up). Every
  one: which file holds the weights varies, and predict reads only the weights
  (a truncated optimiser state alone would rightly not stop it)."""
  data = workdir / 'checkpoints' / '4' / 'default' / 'ocdbt.process_0' / 'd'
  for f in data.iterdir():
    f.write_bytes(f.read_bytes()[:1000])


def _save_nan_step(cfg, workdir: Path, step: int = 6) -> None:
  """Step 4's state with one kernel NaN, saved as ``step``. (Orbax compresses the
  arrays, so flipped bytes on disk fail to decode, as a truncation does; NaN
  weights come from a state that went bad before it was written.)"""
  _, state = checkpoints.restore_latest(cfg, workdir)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p.at[0].set(jnp.nan) if 'ConvBlock_1' in jax.tree_util.keystr(
          path) and p.ndim == 5 else p, state.params)
  manager = checkpoints.checkpoint_manager(workdir, cfg)
  manager.save(step, args=ocp.args.StandardSave(state.replace(
      step=jnp.asarray(step, state.step.dtype), params=params)))
  manager.wait_until_finished()
  manager.close()


def test_predict_refuses_a_truncated_checkpoint_in_one_line(trained, tiny_dataset,
                                                            tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate_latest(workdir)
  r = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), f'--config={ROOT / "configs" / "test.py"}',
       '--mode=predict', f'--workdir={workdir}', f'--output={tmp_path / "out"}',
       f'--input={tiny_dataset / "Utrecht" / "0" / "pre" / "FLAIR.nii.gz"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, r.stderr[-3000:]
  assert errors[0].startswith(f'error: {workdir / "checkpoints" / "4"}: cannot '
                              'restore the checkpoint (')
  assert 'is not valid for value of size 1000' in errors[0]
  assert not [p for p in (tmp_path / 'out').rglob('*') if p.is_file()]


def test_non_finite_weights_are_refused_not_predicted_as_empty_masks(
    trained, tiny_dataset, tmp_path, capsys):
  cfg, _ = trained
  workdir = _copy(trained, tmp_path)
  _save_nan_step(cfg, workdir)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.restore_latest(cfg, workdir)
  assert str(e.value) == (
      f"{workdir / 'checkpoints' / '6'}: the checkpoint holds non-finite values "
      "(NaN or inf in .params['ConvBlock_1']['Conv3D_0']['kernel'])")
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={workdir}',
                            f'--input={tiny_dataset / "Utrecht" / "0" / "pre" / "FLAIR.nii.gz"}',
                            f'--output={tmp_path / "out"}')
  assert code == 1 and errors == [f'error: {e.value}']
  assert not [p for p in (tmp_path / 'out').rglob('*') if p.is_file()]


def test_training_falls_back_to_the_previous_good_checkpoint(trained, tmp_path,
                                                             caplog):
  cfg, _ = trained
  workdir = _copy(trained, tmp_path)
  _truncate_latest(workdir)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.num_steps = 6
  with caplog.at_level(logging.INFO, logger='absl'):
    state = train.train_and_evaluate(cfg, workdir)
  broken = workdir / 'checkpoints.broken' / '4'
  assert (f'{workdir / "checkpoints" / "4"}: cannot restore the checkpoint' in caplog.text
          and 'trying the checkpoint before it' in caplog.text
          and f'{workdir / "checkpoints" / "4"} moved to {broken}' in caplog.text)
  assert 'Resuming from checkpoint at step 2.' in caplog.text
  assert int(state.step) == 6 and broken.is_dir()
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == [4, 6]     # step 4 written again
  _, restored = checkpoints.restore_latest(cfg, workdir)
  assert int(restored.step) == 6


def test_restore_or_init_skips_non_finite_weights_and_refuses_when_none_is_good(
    trained, tmp_path):
  cfg, _ = trained
  workdir = _copy(trained, tmp_path)
  _save_nan_step(cfg, workdir)
  manager = checkpoints.checkpoint_manager(workdir, cfg)
  _, template = checkpoints.restore_latest(cfg, trained[1])
  state = checkpoints.restore_or_init(manager, template)
  assert int(state.step) == 4 and manager.latest_step() == 4
  assert (workdir / 'checkpoints.broken' / '6').is_dir()
  manager.close()
  _truncate_latest(workdir)   # step 2 went when step 6 was saved (max_to_keep=2)
  manager = checkpoints.checkpoint_manager(workdir, cfg)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'checkpoints: none of the checkpoints \(steps 4\) restores'):
    checkpoints.restore_or_init(manager, template)
  manager.close()
  assert (workdir / 'checkpoints' / '4').is_dir()   # none good: nothing moved


def test_any_exception_is_one_error_line_with_the_traceback_at_debug_level(
    monkeypatch, capsys, caplog):
  def boom(config):
    del config
    raise RuntimeError('something unforeseen\nwith a second line')
  monkeypatch.setattr(launch, '_run', boom)
  with caplog.at_level(logging.DEBUG, logger='absl'), pytest.raises(SystemExit) as e:
    launch.main(['launch.py'])
  assert e.value.code == 1
  assert capsys.readouterr().err.splitlines() == [
      'error: RuntimeError: something unforeseen [...] (--verbosity=1 shows all and '
      'the traceback)']
  tracebacks = [r for r in caplog.records if r.message == 'traceback']
  assert tracebacks and tracebacks[0].exc_info[0] is RuntimeError
  # Our refusals stay as they were: the message alone, naming the path.
  assert launch.error_line(FileNotFoundError('x: no such file')) == 'error: x: no such file'
  assert launch.error_line(KeyError('k')) == "error: KeyError: 'k'"
  assert launch.error_line(RuntimeError()) == 'error: RuntimeError'


def test_init_from_a_damaged_source_checkpoint_is_refused_in_one_line(
    trained, tiny_dataset, tmp_path, capsys):
  cfg, _ = trained
  source = _copy(trained, tmp_path)
  # Every data file of step 4 cut to 1000 bytes: which of them hold the
  # parameters (the only arrays init_from reads) varies from run to run.
  data = source / 'checkpoints' / '4' / 'default' / 'ocdbt.process_0' / 'd'
  for f in data.iterdir():
    if f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:1000])
  _, template = checkpoints.restore_latest(cfg, trained[1])
  tx = steps.create_optimizer(cfg.train)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.initialise_from(str(source), template, tx)
  message = str(e.value)
  assert message.startswith(f'train.init_from={source}: cannot restore its '
                            f'checkpoint {source / "checkpoints" / "4"} ('), message
  assert 'is not valid for value of size 1000' in message and '\n' not in message
  # Through launch: that line alone, exit 1, and the new run starts nothing.
  code, errors = run_launch(capsys, '--mode=train', f'--workdir={tmp_path / "new"}',
                            data__root=str(tiny_dataset), data__synthetic=False,
                            train__init_from=str(source))
  # (Which array's read fails first varies: the reason names that one.)
  assert code == 1 and len(errors) == 1, errors
  assert errors[0].startswith(f'error: {message[:message.index("(")]}('), errors[0]
  assert 'is not valid for value of size 1000' in errors[0]
  assert not list((tmp_path / 'new' / 'checkpoints').glob('[0-9]*'))
  # A source whose latest weights hold a NaN: refused, not fine-tuned from.
  nan_source = Path(shutil.copytree(trained[1], tmp_path / 'nan'))
  _save_nan_step(cfg, nan_source)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.initialise_from(str(nan_source), template, tx)
  assert str(e.value) == (
      f'train.init_from={nan_source}: its checkpoint '
      f'{nan_source / "checkpoints" / "6"} holds non-finite values (NaN or inf in '
      "['params']['ConvBlock_1']['Conv3D_0']['kernel'])")


def test_predict_refuses_a_checkpoint_without_its_metadata_in_one_line(
    trained, tiny_dataset, tmp_path):
  workdir = _copy(trained, tmp_path)
  (workdir / 'checkpoints' / '4' / 'default' / '_METADATA').unlink()
  r = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), '--mode=predict', f'--workdir={workdir}',
       f'--output={tmp_path / "out"}',
       f'--input={tiny_dataset / "Utrecht" / "0" / "pre" / "FLAIR.nii.gz"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert errors == [f'error: {workdir / "checkpoints" / "4"}: cannot restore the '
                    'checkpoint (FileNotFoundError: its metadata is missing (no '
                    'default/_METADATA))'], r.stderr[-3000:]
  assert not (tmp_path / 'out').exists()
