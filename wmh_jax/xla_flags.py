"""XLA:CPU settings a run asks for, set before JAX starts (launch.py).

``config.xla_cpu_onednn``: XLA:CPU hands its matrix products to oneDNN. The
U-Net's convolutions are products (the Winograd and sub-pixel forms of
``convs.py``). On a 2-core AVX-512 Xeon the main job's train step alone
(``--mode=benchmark``) took 0.50 s against 0.60 s, with the same losses to float32
round-off and the same results run to run (docs/results.md, stop 39). Inside
the training loop it was bimodal (0.66-0.87 s a step against 0.78-0.80 s) while
TensorFlow, which runs tf.data in the same process, used its own oneDNN too;
with TF's off (``TF_ENABLE_ONEDNN_OPTS=0``, set here with the XLA flags) and
``data.pipeline_threads=1`` it took 0.58-0.63 s against 0.72-1.23 s (stop 40).
It is off by default all the same: in a fresh main job (on a 2-core AMD EPYC)
it deadlocked at step ~15 and never went on (both of XLA's intra-op threads
waiting inside oneDNN's nested ``parallel``, each for work only the other could
run: XLA's ``OneDnnThreadPool``, a pool of two on two cores), so a run with it
can hang for good. The tests run it pinned to one core (a pool of one: no second
thread to wait for).

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts, and TF its variable
when it loads, so both go into the environment before that; they are recorded
with the run (``machine.environment``: ``environment.json``) and in benchmark
lines.

Pure helpers (:func:`with_onednn`, :func:`wanted`) and one function that
changes the environment (:func:`apply`: launch.py, and tests/conftest.py for the
tests).
"""

import os
import platform

# oneDNN for XLA:CPU's dot products (convolutions stay XLA's own). Without the
# fusion type oneDNN takes none of this network's products (0.635 s a step).
ONEDNN = ('--xla_cpu_use_onednn=true',
          '--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT')
# Machines where they are set: x86-64, the only kind measured (oneDNN's XLA:CPU
# path is built for it). XLA stops at a flag it does not know: pyproject.toml
# asks for a jax (0.10.2, the one measured) whose XLA knows both.
ONEDNN_MACHINES = ('x86_64', 'amd64')
# TensorFlow's own oneDNN (its ops in tf.data), off beside XLA's: two oneDNN
# runtimes in one process made the training step bimodal (stop 39).
TF_ONEDNN = ('TF_ENABLE_ONEDNN_OPTS', '0')


def with_onednn(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with :data:`ONEDNN` added, unless it
  names either setting already: a user's own choice stands."""
  names = [f.split('=', 1)[0] for f in ONEDNN]
  if any(name in flags for name in names):
    return flags
  return ' '.join([flags.strip(), *ONEDNN]).strip()


def wanted(config, machine: str | None = None) -> bool:
  """Whether ``config`` asks for oneDNN (``xla_cpu_onednn``, off by default) on a
  machine (``platform.machine()`` when None) that has it."""
  machine = (machine or platform.machine()).lower()
  return bool(config.get('xla_cpu_onednn', False)) and machine in ONEDNN_MACHINES


def apply(config, environ=None) -> bool:
  """Sets ``XLA_FLAGS`` in ``environ`` (``os.environ``) for ``config``, and
  :data:`TF_ONEDNN` unless the user set that variable; returns whether oneDNN was
  asked for. Call it before JAX starts its CPU backend and TensorFlow loads."""
  environ = os.environ if environ is None else environ
  if not wanted(config):
    return False
  environ['XLA_FLAGS'] = with_onednn(environ.get('XLA_FLAGS', ''))
  environ.setdefault(*TF_ONEDNN)
  return True
