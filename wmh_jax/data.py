"""The dataset of a run: make the synthetic data if needed, split, prepare, cache.

Prepared subjects (grid arrays plus native labels and geometry) are cached in
``WORKDIR/prepared`` as ``.npz`` files (read with ``allow_pickle=False``), keyed by
the source files' size and mtime and by the grid, so reruns skip the decoding.
"""

import concurrent.futures
import hashlib
import multiprocessing
import os
from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import subjects as subjects_lib


def ensure_synthetic(config) -> Path:
  """Generates ``config.data.root`` when it is missing and synthetic data is on."""
  root = Path(config.data.root)
  if not config.data.synthetic:
    return root
  from wmh_jax import synthetic  # pylint: disable=import-outside-toplevel
  n = config.data.num_subjects
  todo = [i for i in range(n) if not (
      root / synthetic.SITES[i % len(synthetic.SITES)] / synthetic.subject_id(i)
      / 'wmh.nii.gz').exists()]
  if not todo:
    return root
  logging.info('Generating %d synthetic subjects (seed %d) in %s ...', len(todo),
               config.data.synthetic_seed, root)
  args = [(str(root), config.data.synthetic_seed, i) for i in todo]
  _parallel_map(synthetic.write_one, args, 'synthetic subject')
  return root


def _parallel_map(fn, args: list[tuple], what: str) -> None:
  """Runs ``fn(*a)`` for every ``a`` in ``args``, one process a core, logging progress.

  The results are discarded: the workers' output is the files they write.
  """
  workers = max(1, min(os.cpu_count() or 1, len(args)))
  step = max(1, len(args) // 6)
  if workers == 1:
    results = (fn(*a) for a in args)
    pool = None
  else:
    ctx = multiprocessing.get_context('spawn')  # no fork after TF/JAX start
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    results = pool.map(fn, *zip(*args))
  try:
    for k, _ in enumerate(results):
      if (k + 1) % step == 0 or k + 1 == len(args):
        logging.info('%s %d/%d', what, k + 1, len(args))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)


def _cache_path(workdir: Path, s: subjects_lib.SubjectFiles, grid) -> Path:
  h = hashlib.sha1(repr(grid).encode())
  for f in (s.flair, s.wmh):
    if f is not None:
      st = f.stat()
      h.update(f'{f.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode())
  return workdir / 'prepared' / f'{s.site.replace("/", "_")}_{s.id}_{h.hexdigest()[:12]}.npz'


def prepare_cached(s: subjects_lib.SubjectFiles, grid, workdir) -> dict:
  """``subjects.prepare_subject`` with an on-disk cache in ``workdir/prepared``."""
  path = _cache_path(Path(workdir), s, grid)
  if path.exists():
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
    out['key'] = str(out['key'])
    return out
  out = subjects_lib.prepare_subject(s, grid)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.npz')
  np.savez(tmp, **out)
  os.replace(tmp, path)
  return out


def _prepare_to_cache(s, grid, workdir) -> None:
  prepare_cached(s, grid, workdir)  # a worker: the arrays stay on disk


def load_splits(config, workdir) -> tuple[list[dict], list[dict]]:
  """Prepared ``(train, val)`` subjects, split by subject within each site."""
  root = ensure_synthetic(config)
  found = subjects_lib.find_subjects(root, config.data.missing_mask)
  train, val = subjects_lib.split_subjects(found, config.data.val_fraction,
                                           config.seed)
  grid = tuple(config.data.grid)
  logging.info('Preparing %d subjects on the %s grid ...', len(found), grid)
  todo = [(s, grid, Path(workdir)) for s in train + val
          if not _cache_path(Path(workdir), s, grid).exists()]
  if len(todo) > 1:  # decode the new ones in parallel; all are read back below
    _parallel_map(_prepare_to_cache, todo, 'prepared subject')
  prepared = [prepare_cached(s, grid, workdir) for s in train + val]
  return prepared[:len(train)], prepared[len(train):]
