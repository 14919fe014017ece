"""Reproducible runs, a non-finite loss stopped cleanly, and kill -9 resumed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from configs import test as test_config
from wmh_jax import checkpoints
from wmh_jax import train

ROOT = Path(__file__).resolve().parents[1]


def _losses(workdir):
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  acc.Reload()
  return [(e.step, tf.make_ndarray(e.tensor_proto).item())
          for e in acc.Tensors('train/loss')]


def test_same_config_and_seed_give_the_same_loss_curve_bit_for_bit(tiny_dataset,
                                                                   tmp_path):
  cfg = test_config.for_dataset(tiny_dataset, num_steps=6, log_every_steps=1,
                                eval_every_steps=100, checkpoint_every_steps=100)
  train.train_and_evaluate(cfg, tmp_path / 'a')
  train.train_and_evaluate(cfg, tmp_path / 'b')
  a, b = _losses(tmp_path / 'a'), _losses(tmp_path / 'b')
  assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
  assert a == b  # exact float equality, every step
  # Another seed, the same split (data.split_seed): the curve differs by the
  # seed's initialisation and augmentation alone.
  cfg.seed = 1
  train.train_and_evaluate(cfg, tmp_path / 'c')
  assert ((tmp_path / 'c' / 'split.json').read_text() ==
          (tmp_path / 'a' / 'split.json').read_text())
  assert _losses(tmp_path / 'c') != a


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_dataset, tmp_path):
  cfg = test_config.for_dataset(tiny_dataset, num_steps=4, checkpoint_every_steps=2,
                                eval_every_steps=100)
  train.train_and_evaluate(cfg, tmp_path)
  # The same run continued at lr 1e30: Adam moves every weight by ~1e30 at
  # step 5, and the step-6 forward pass overflows.
  cfg = test_config.for_dataset(tiny_dataset, num_steps=12, learning_rate=1e30,
                                warmup_steps=1, log_every_steps=1,
                                checkpoint_every_steps=1, eval_every_steps=100)
  with pytest.raises(FloatingPointError, match=r'non-finite \w+ at step (\d+)') as e:
    train.train_and_evaluate(cfg, tmp_path)
  bad = int(e.value.args[0].split('at step ')[1].split(';')[0])
  manager = checkpoints.checkpoint_manager(tmp_path, cfg, read_only=True)
  kept = manager.latest_step()
  manager.close()
  assert kept is not None and kept < bad
  assert f'checkpoint (step {kept})' in str(e.value)
  # The kept checkpoint is finite and resumable.
  _, state = checkpoints.restore_latest(cfg, tmp_path)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def _launch_train(workdir, data_root, num_steps):
  return [sys.executable, str(ROOT / 'launch.py'),
          '--config=' + str(ROOT / 'configs' / 'test.py'), '--mode=train',
          f'--workdir={workdir}', f'--config.data.root={data_root}',
          '--config.data.synthetic=False', f'--config.train.num_steps={num_steps}',
          '--config.train.checkpoint_every_steps=2', '--config.train.eval_every_steps=1000',
          '--config.train.max_checkpoints=3']


def test_kill_9_then_the_same_command_resumes_from_a_complete_checkpoint(
    tiny_dataset, tmp_path):
  cmd = _launch_train(tmp_path, tiny_dataset, 16)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  ckpt = tmp_path / 'checkpoints'
  deadline = time.time() + 240
  try:
    # Kill as soon as a second checkpoint is being written or done.
    while time.time() < deadline and proc.poll() is None:
      names = [p.name for p in ckpt.iterdir() if p.name[0].isdigit()] if ckpt.exists() else []
      if len(names) >= 2:
        break
      time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  # A checkpoint write cut short looks like this: never to be loaded.
  (ckpt / '14.orbax-checkpoint-tmp-1234567890').mkdir()
  (ckpt / '14.orbax-checkpoint-tmp-1234567890' / 'junk').write_bytes(b'\0' * 100)
  complete = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert complete, 'no complete checkpoint before the kill'
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'Resuming from checkpoint at step {max(complete)}.' in r.stderr
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps[-1] == 16


def test_finite_check_names_what_went_wrong_and_accepts_zeros(tmp_path):
  manager = checkpoints.checkpoint_manager(tmp_path, test_config.get_config(),
                                           read_only=True)
  ok = {'loss': 0.0, 'grad_norm': 0.0, 'params_finite': True}
  train._check_finite([ok, ok], 1, manager)  # pylint: disable=protected-access
  for key, value, what in (('loss', float('nan'), 'loss'),
                           ('grad_norm', float('inf'), 'gradient'),
                           ('params_finite', False, 'weights')):
    with pytest.raises(FloatingPointError, match=f'non-finite {what} at step 4;'):
      train._check_finite([ok, {**ok, key: value}], 3, manager)  # pylint: disable=protected-access
  manager.close()
