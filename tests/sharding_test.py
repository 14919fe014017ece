"""Data parallelism: a batch sharded over 2 devices gives one device's results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_sharded_step_matches_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  r = subprocess.run([sys.executable, str(Path(__file__).with_name('sharding_check.py'))],
                     capture_output=True, text=True, env=env, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['devices'] == 2 and out['batch_shards'] == 2
  assert out['loss_sharded'] == pytest.approx(out['loss_one'], rel=1e-5)
  assert out['grad_max_abs_diff'] <= 1e-5 * max(1.0, out['grad_max_abs'])
  assert out['step_loss_sharded'] == pytest.approx(out['step_loss_one'], rel=1e-5)
  assert out['params_after_step_max_abs_diff'] < 1e-5
