"""Keeps freed host memory in the process, so XLA:CPU does not page-fault every step.

XLA:CPU allocates each execution's buffers with ``posix_memalign``. Its worker
threads allocate from glibc's per-thread arenas, which hand any block larger than
their 64 MiB heaps to a fresh ``mmap`` and give it back with ``munmap`` when freed.
Every train step therefore touches gigabytes of brand-new pages, and the kernel
faults and zeroes each 4 KiB page: measured here, writing a fresh 96 MiB output
took 42 ms against 5.5 ms into a reused buffer, and the faults were most of a
train step's system time.

:func:`keep_freed_memory` sets glibc's ``mallopt`` so that every thread shares the
main arena (``M_ARENA_MAX=1``), large blocks come from the heap instead of
``mmap`` (``M_MMAP_MAX=0``), and the heap is never trimmed (``M_TRIM_THRESHOLD``):
from the second step on, buffers reuse pages already mapped. The cost: the process keeps its peak heap until it exits, or until
:func:`release_freed_memory` (between programs with different buffers, e.g. the
settings of the benchmark, whose heaps would otherwise pile up). It acts on the
whole process (the PyTorch side of bench/torch_side_by_side.py gets the same
allocator), must run before the threads start allocating, and does nothing off
glibc.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = -1  # mallopt takes an int; glibc reads -1 as SIZE_MAX: never trim


def _libc():
  """glibc, or None where the C library cannot be loaded."""
  try:
    return ctypes.CDLL(ctypes.util.find_library('c'))
  except (OSError, TypeError):
    return None


def keep_freed_memory() -> bool:
  """Applies the settings above; returns False where glibc's mallopt is missing."""
  mallopt = getattr(_libc(), 'mallopt', None)
  if mallopt is None:
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                             (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def release_freed_memory() -> bool:
  """Gives freed heap memory back to the system (glibc ``malloc_trim(0)``)."""
  malloc_trim = getattr(_libc(), 'malloc_trim', None)
  return malloc_trim is not None and bool(malloc_trim(0))
