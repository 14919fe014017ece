"""What machine a figure was measured on: CPU model, cores, vector extensions
(AVX2, AVX-512, AMX) and the JAX device, for every benchmark JSON line, so that
figures from different machines are never compared by mistake; with the package
versions and the code's commit, for every training run (``environment``:
``WORKDIR/environment.json``, ``run_record``)."""

import functools
import importlib.metadata
import os
from pathlib import Path
import platform
import subprocess

VECTOR_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile',
                'amx_bf16', 'amx_int8')


def _cpuinfo(text: str) -> tuple[str, set[str]]:
  """``(model name, flags)`` of the first processor in ``/proc/cpuinfo`` text."""
  model, flags = '', set()
  for line in text.splitlines():
    key, _, value = line.partition(':')
    key = key.strip()
    if key == 'model name' and not model:
      model = value.strip()
    elif key == 'flags' and not flags:
      flags = set(value.split())
  return model, flags


@functools.cache
def cpu() -> dict:
  """``{'cpu': model, 'cpu_cores': n, 'cpu_vector': [extensions present]}``;
  the extensions are those of ``VECTOR_FLAGS`` Linux reports (empty elsewhere)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      model, flags = _cpuinfo(f.read())
  except OSError:
    model, flags = '', set()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
      os.cpu_count() or 0)
  return {'cpu': model or platform.processor() or platform.machine(),
          'cpu_cores': cores, 'cpu_vector': [f for f in VECTOR_FLAGS if f in flags]}


def describe() -> dict:
  """:func:`cpu` and the first JAX device's kind (``'cpu'``, ``'NVIDIA H100 ...'``)."""
  import jax  # pylint: disable=import-outside-toplevel
  return {**cpu(), 'device': jax.devices()[0].device_kind}


# The distributions whose versions can move a run's numbers (tensorflow under
# either of its wheel names).
PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'flax', 'optax',
            'orbax-checkpoint', 'numpy', 'scipy', 'tensorflow', 'tensorflow-cpu',
            'tensorflow-datasets', 'nibabel', 'ml-collections', 'clu')
# Environment variables that change what XLA, JAX or TensorFlow compute (named
# ones only beyond XLA_ and JAX_: TF_ also prefixes Terraform's tokens).
ENV_PREFIXES = ('XLA_', 'JAX_')
ENV_NAMES = ('TF_ENABLE_ONEDNN_OPTS', 'TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS',
             'TF_DETERMINISTIC_OPS', 'OMP_NUM_THREADS', 'CUDA_VISIBLE_DEVICES')


def packages() -> dict:
  """``{distribution: version}`` of :data:`PACKAGES` that are installed."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def code_revision(root=None) -> dict:
  """``{'commit': sha, 'modified': bool}`` of the git checkout whose top folder
  holds this package (``root``: another folder); ``{}`` where that folder is not
  a checkout's top (e.g. an installed copy inside some other repository), git
  is missing or does not answer in 5 s. ``modified``: tracked files differ from
  the commit (an untracked new file does not count). Takes no lock: a user's
  own git command in the checkout is never kept waiting."""
  root = (Path(root) if root else Path(__file__).resolve().parents[1]).resolve()
  env = {k: v for k, v in os.environ.items()
         if k not in ('GIT_DIR', 'GIT_WORK_TREE', 'GIT_INDEX_FILE')}
  try:
    run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True,
                            timeout=5, check=True, env=env)
    git = ['git', '--no-optional-locks']
    top = run([*git, 'rev-parse', '--show-toplevel']).stdout.strip()
    if not top or Path(top).resolve() != root:
      return {}
    commit = run([*git, 'rev-parse', 'HEAD']).stdout.strip()
    status = run([*git, 'status', '--porcelain', '--untracked-files=no']).stdout
  except (OSError, subprocess.SubprocessError):
    return {}
  return {'commit': commit, 'modified': bool(status.strip())}


def environment() -> dict:
  """What a run's numbers depend on besides its config: :func:`describe` (CPU,
  device), the JAX backend and device count, Python, the OS, :func:`packages`,
  :func:`code_revision` and the environment variables that change the numbers
  (``XLA_*``, ``JAX_*`` and :data:`ENV_NAMES`)."""
  import jax  # pylint: disable=import-outside-toplevel
  return {**describe(), 'backend': jax.default_backend(),
          'device_count': jax.device_count(), 'process_count': jax.process_count(),
          'python': platform.python_version(), 'os': platform.platform(),
          'packages': packages(), 'code': code_revision(),
          'env': {k: v for k, v in sorted(os.environ.items())
                  if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}}
