"""What machine a benchmark figure was measured on: CPU model, cores, vector
extensions (AVX2, AVX-512, AMX) and the JAX device, for every JSON line, so that
figures from different machines are never compared by mistake."""

import functools
import os
import platform

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
