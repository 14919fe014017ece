"""Tiny CPU config for the tests: a two-level U-Net on a 32x32x8 grid, a few steps.

  python launch.py --config=configs/test.py --workdir=/tmp/wmh_test \
      --config.data.root=/tmp/wmh_jax_test_data
"""

import os

from configs import default


def get_config():
  c = default.get_config()
  # The tests run many small programs in one process (launch.main in-process):
  # the allocator stays as the process started (host_memory has its own test).
  c.keep_freed_memory = False
  # XLA's own kernels, as the default's, whatever the default becomes: the tests'
  # reference values were computed with them (tests/xla_flags_test.py checks
  # oneDNN's output on its own, on one core).
  c.xla_cpu_onednn = False
  # The tests' own folder (tests/conftest.py sets it for each session), so that
  # a folder left by another generator version is never read.
  c.data.root = os.environ.get('WMH_JAX_TEST_DATA', '/tmp/wmh_jax_test_data')
  c.data.num_subjects = 6
  c.data.val_root = ''                  # split data.root by subject
  c.data.test_root = ''                 # no test set: the tests stay fast
  c.data.grid = (32, 32, 8)
  c.data.grid_max_depth = 0             # every scan on the grid (grid_depth_test: per scan)
  c.data.val_fraction = 0.34
  c.data.shuffle_buffer = 8
  c.model.encoder_filters = ((4, 8), (8, 16))
  c.model.kernel_sizes = ((3, 3, 1), (3, 3, 3))
  c.model.pool_sizes = ((2, 2, 1), (2, 2, 2))
  c.model.bottleneck_filters = (16, 16)
  c.model.bottleneck_kernel = (3, 3, 3)
  c.model.decoder_filters = (4, 8)
  c.train.patch_size = None
  c.train.num_steps = 12
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 2
  c.train.log_every_steps = 4
  c.train.eval_every_steps = 6
  c.train.checkpoint_every_steps = 6
  # The tiny runs are too short for the default's 0.1: the brain channel would
  # not be learnt in 24 steps (brain Dice 0.51 against 0.92 at 1.0).
  c.loss.brain_weight = 1.0
  c.refine.num_steps = 60
  c.refine.batch_size = 1024
  c.evaluate.num_images = 1
  return c


def for_dataset(root, **train_overrides):
  """The test config on the dataset at ``root`` (no synthesis), with train overrides."""
  c = get_config()
  c.data.root = str(root)
  c.data.synthetic = False
  for k, v in train_overrides.items():
    c.train[k] = v
  return c
