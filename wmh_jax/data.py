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
  workers = max(1, min(os.cpu_count() or 1, len(todo)))
  args = [(str(root), config.data.synthetic_seed, i) for i in todo]
  if workers == 1:
    for k, a in enumerate(args):
      synthetic.write_one(*a)
      logging.info('synthetic subject %d/%d', k + 1, len(todo))
  else:
    ctx = multiprocessing.get_context('spawn')  # no fork after TF/JAX start
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      for k, _ in enumerate(pool.map(synthetic.write_one, *zip(*args))):
        if (k + 1) % 10 == 0 or k + 1 == len(todo):
          logging.info('synthetic subject %d/%d', k + 1, len(todo))
  return root


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


def load_splits(config, workdir) -> tuple[list[dict], list[dict]]:
  """Prepared ``(train, val)`` subjects, split by subject within each site."""
  root = ensure_synthetic(config)
  found = subjects_lib.find_subjects(root, config.data.missing_mask)
  train, val = subjects_lib.split_subjects(found, config.data.val_fraction,
                                           config.seed)
  grid = tuple(config.data.grid)
  logging.info('Preparing %d subjects on the %s grid ...', len(found), grid)
  prepared = [prepare_cached(s, grid, workdir) for s in train + val]
  return prepared[:len(train)], prepared[len(train):]
