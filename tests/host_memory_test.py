"""glibc keeps freed memory: a second big allocation reuses mapped pages."""

import subprocess
import sys

import pytest

# In a fresh interpreter (the setting holds for the whole process): malloc, fill
# and free 256 MiB in a worker thread (as XLA's threads allocate), twice; print the
# page faults of the second time. (malloc, not numpy: numpy asks for huge pages.)
SCRIPT = r'''
import ctypes, resource, sys, threading
from wmh_jax import host_memory
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 1 << 28
out = []
def fill_and_free():
  p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
def work():
  fill_and_free()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fill_and_free()
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
print(out[0])
'''
PAGES = (1 << 28) // 4096


def _faults(mode):
  done = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True,
                        text=True, check=True)
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  assert _faults('default') > PAGES // 2      # glibc's default: munmap, then fault
  assert _faults('keep') < PAGES // 20        # kept: the pages are still mapped


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_release_gives_kept_memory_back():
  script = SCRIPT.replace("print(out[0])", """
from wmh_jax import host_memory
def rss():
  return int(open('/proc/self/statm').read().split()[1])
before = rss()
assert host_memory.release_freed_memory()
print(before - rss())""")
  done = subprocess.run([sys.executable, '-c', script, 'keep'], capture_output=True,
                        text=True, check=True)
  assert int(done.stdout.split()[-1]) > PAGES // 2  # the 256 MiB left the process
