"""wmh_jax.xla_flags: the XLA_FLAGS a launch sets, and that oneDNN computes what
XLA's own kernels compute."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import default
from wmh_jax import xla_flags


def _config(onednn):
  c = ml_collections.ConfigDict()
  if onednn is not None:
    c.xla_cpu_onednn = onednn
  return c


def test_with_onednn_adds_both_settings_after_the_users_flags():
  out = xla_flags.with_onednn('--xla_force_host_platform_device_count=2')
  assert out.split() == ['--xla_force_host_platform_device_count=2', *xla_flags.ONEDNN]
  assert xla_flags.with_onednn('').split() == list(xla_flags.ONEDNN)
  assert xla_flags.with_onednn(out) == out  # applied twice: unchanged


@pytest.mark.parametrize('user', ['--xla_cpu_use_onednn=false',
                                  '--xla_cpu_experimental_onednn_fusion_type='])
def test_with_onednn_keeps_a_users_own_onednn_setting(user):
  assert xla_flags.with_onednn(user) == user


def test_wanted_follows_the_config_and_the_machine():
  # Off by default: it can deadlock a run (docs/results.md, stop 40).
  assert not default.get_config().xla_cpu_onednn
  assert xla_flags.wanted(_config(True), 'x86_64')
  assert xla_flags.wanted(_config(True), 'AMD64')
  assert not xla_flags.wanted(_config(True), 'arm64')
  assert not xla_flags.wanted(_config(False), 'x86_64')
  assert not xla_flags.wanted(_config(None), 'x86_64')  # a config without the key


def test_apply_sets_only_the_environment_it_is_given():
  env = {'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'}
  asked = xla_flags.apply(_config(True), env)
  assert asked == xla_flags.wanted(_config(True))
  if asked:
    assert env == {'XLA_FLAGS': ' '.join(['--xla_cpu_enable_fast_math=false',
                                          *xla_flags.ONEDNN]),
                   'TF_ENABLE_ONEDNN_OPTS': '0'}   # TF's own oneDNN off beside XLA's
    env = {'TF_ENABLE_ONEDNN_OPTS': '1'}           # a user's own choice stands
    xla_flags.apply(_config(True), env)
    assert env['TF_ENABLE_ONEDNN_OPTS'] == '1'
  env = {}
  assert not xla_flags.apply(_config(False), env)
  assert env == {}


_FORWARD = r'''
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, before XLA starts
import jax, numpy as np
jax.config.update('jax_threefry_partitionable', False)
from configs import default
from wmh_jax import models
model = models.create_model(default.get_config().model)  # the main job's network
x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 8, 1))
v = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
text = fn.lower(v, x).compile().as_text()
y = np.asarray(fn(v, x), np.float64)
names = [open(f'/proc/self/task/{t}/comm').read().strip()
         for t in os.listdir('/proc/self/task')]
json.dump({'onednn': 'onednn' in text.lower(), 'y': y.ravel().tolist(),
           'pool': names.count('tf_XLAEigen')}, sys.stdout)  # XLA's intra-op threads
'''


def _forward(flags: str) -> dict:
  """The main job's network on a small input in a fresh process under ``flags``,
  which pins itself to one core: XLA sizes its thread pool by the cores it may use, and
  oneDNN's nested parallel loops can deadlock a pool of two or more (stop 40),
  which would hang the test instead of failing it."""
  env = dict(os.environ, XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, '-c', _FORWARD], env=env, capture_output=True,
                       text=True, timeout=600, check=True)
  return json.loads(out.stdout)


@pytest.mark.skipif(not xla_flags.wanted(_config(True)),
                    reason='oneDNN is set on x86-64 only')
@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity')
                    or not os.path.isdir('/proc/self/task'),
                    reason='pinning to one core: Linux')
def test_onednn_computes_the_networks_output_to_float32_round_off():
  own, onednn = _forward('--xla_cpu_use_onednn=false'), _forward(xla_flags.with_onednn(''))
  assert not own['onednn'] and onednn['onednn']  # the flags reach the compiled program
  assert own['pool'] == onednn['pool'] == 1      # one core: a pool that cannot deadlock
  a, b = np.array(own['y']), np.array(onednn['y'])
  assert a.shape == b.shape and a.size == 2 * 32 * 32 * 8  # lesion and brain logits
  assert np.abs(b - a).max() <= 1e-4 * np.abs(a).max()
