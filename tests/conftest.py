"""Shared fixtures: a tiny challenge-layout dataset written with nibabel."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# The repo root is on sys.path by pyproject.toml's pytest `pythonpath` (for
# `import launch`, a script, and for this checkout's package when it is not the
# one `pip install -e` points at); PYTHONPATH carries it into the scripts the
# tests start (sharding_check.py).
ROOT = str(Path(__file__).resolve().parents[1])
os.environ['PYTHONPATH'] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# predict's default compilation cache lives under $XDG_CACHE_HOME: the tests'
# launches write theirs into a folder of their own, never the user's ~/.cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='wmh_jax_test_cache_')
atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)
# configs/test.py's synthetic data folder: this session's own (a folder made by
# an earlier generator version is refused, rightly, and would fail the tests).
os.environ['WMH_JAX_TEST_DATA'] = os.path.join(
    tempfile.mkdtemp(prefix='wmh_jax_test_data_'), 'synthetic')
atexit.register(shutil.rmtree, os.path.dirname(os.environ['WMH_JAX_TEST_DATA']),
                ignore_errors=True)
# The global JAX settings launch.py makes (in ``_run``), so that the tests draw
# the random numbers a launch draws; the environment variable carries them into
# the Python subprocesses the tests start (sharding_check.py).
os.environ['JAX_THREEFRY_PARTITIONABLE'] = '0'
# And the XLA flags a launch of configs/test.py sets (wmh_jax/xla_flags.py; none:
# its xla_cpu_onednn is off, as the default's), before XLA's CPU backend
# starts: the tests compute as a launch does, whichever test starts it first.
from configs import test as _test_config  # pylint: disable=wrong-import-position
from wmh_jax import xla_flags  # pylint: disable=wrong-import-position
xla_flags.apply(_test_config.get_config())

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_threefry_partitionable', False)

import flax  # pylint: disable=wrong-import-position

from wmh_jax import nifti_io  # pylint: disable=wrong-import-position

SITES = ('Utrecht', 'Singapore', 'Amsterdam/GE3T')
NO_BRAIN = 'Amsterdam/GE3T/2'  # the tiny dataset's one subject without brain.nii.gz


class NoWeights(flax.struct.PyTreeNode):
  """A train state without weights, for stand-in networks that need none
  (``steps.inference_weights`` moves a state's weights with ``replace``)."""
  params: object = None
  batch_stats: object = None


def write_tiny_subject(folder: Path, rng, shape=(40, 36, 12), affine=None,
                       with_mask=True, other=True, with_brain=False):
  """An ellipsoid 'brain' with bright blobs (label 1) and a dark one (label 2);
  ``with_brain`` also writes the ellipsoid as ``brain.nii.gz``."""
  affine = np.diag([1.2, 1.2, 3.0, 1.0]) if affine is None else affine
  g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij')
  brain = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.8
  img = np.where(brain, 100.0, 5.0) + rng.normal(0, 3, shape)
  labels = np.zeros(shape, np.uint8)
  for _ in range(3):
    c = rng.uniform(-0.4, 0.4, 3)
    blob = sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < 0.03
    labels[blob & brain] = 1
  if other:
    c = rng.uniform(-0.3, 0.3, 3)
    labels[(sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < 0.01) & (labels == 0)] = 2
  img = np.where(labels == 1, 180.0, np.where(labels == 2, 20.0, img))
  nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', img.astype(np.float32), affine)
  if with_mask:
    nifti_io.save(folder / 'wmh.nii.gz', labels, affine, dtype=np.uint8)
  if with_brain:
    write_brain(folder, brain, affine)
  return img, labels


def write_brain(folder: Path, brain: np.ndarray, affine) -> Path:
  """``folder/brain.nii.gz``: a 0/1 uint8 brain mask, as the generator writes it."""
  return nifti_io.save(folder / 'brain.nii.gz', brain.astype(np.uint8), affine,
                       dtype=np.uint8)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> Path:
  """9 subjects, 3 per site, in the challenge layout; all but the last
  (``NO_BRAIN``) with a brain mask."""
  root = tmp_path_factory.mktemp('wmh_tiny')
  rng = np.random.default_rng(0)
  for site in SITES:
    for i in range(3):
      write_tiny_subject(root / site / f'{i}', rng,
                         with_brain=f'{site}/{i}' != NO_BRAIN)
  return root
