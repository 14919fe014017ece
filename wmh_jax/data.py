"""The dataset of a run: make the synthetic data if needed, split, prepare, cache.

Prepared subjects (grid arrays plus native labels and geometry) are cached in
``WORKDIR/prepared`` as ``.npz`` files (read with ``allow_pickle=False``), keyed by
the source files' size and mtime and by the grid, so reruns skip the decoding.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

from absl import logging
import numpy as np

from wmh_jax import atomic_write
from wmh_jax import subjects as subjects_lib

CACHE_VERSION = 4  # bump when prepare_subject's output changes


def ensure_synthetic(config) -> Path:
  """Generates the synthetic data when it is missing and synthetic data is on.

  ``data.root`` gets ``data.num_subjects`` subjects of ``data.synthetic_seed``;
  ``data.val_root``, when set, ``data.num_val_subjects`` of ``data.val_synthetic_seed``
  (validation subjects from a seed training never sees). Returns ``data.root``.
  """
  root = Path(config.data.root)
  if not config.data.synthetic:
    return root
  from wmh_jax import synthetic  # pylint: disable=import-outside-toplevel
  sets = [(root, config.data.synthetic_seed, config.data.num_subjects)]
  if config.data.val_root:
    sets.append((Path(config.data.val_root), config.data.val_synthetic_seed,
                 config.data.num_val_subjects))
  for folder, seed, _ in sets:
    _check_marker(folder, seed, synthetic.GENERATOR_VERSION)
  args = [(str(folder), seed, i) for folder, seed, n in sets for i in range(n)
          if not (synthetic.subject_folder(folder, seed, i) / 'wmh.nii.gz').exists()]
  if args:
    logging.info('Generating %d synthetic subjects in %s ...', len(args),
                 ' and '.join(str(f) for f, _, _ in sets))
    _parallel_map(synthetic.write_one, args, 'synthetic subject')
  return root


def _check_marker(folder: Path, seed: int, version: str) -> None:
  """Refuses to add subjects to a folder made by another generator or seed.

  ``FOLDER/synthetic.json`` records both; a folder without it that already holds
  subjects is refused too. Nothing is deleted: the user decides.
  """
  marker = folder / 'synthetic.json'
  want = {'generator_version': version, 'seed': int(seed)}
  if marker.exists():
    have = json.loads(marker.read_text())
    if have != want:
      raise ValueError(f'{marker}: the folder holds synthetic data of {have}, the '
                       f'config asks for {want}; delete the folder or point the '
                       'config elsewhere')
    return
  if any(folder.glob('*/*/wmh.nii.gz')):
    raise ValueError(f'{folder}: holds subjects but no synthetic.json (made by an '
                     'older version?); delete the folder or point the config elsewhere')
  folder.mkdir(parents=True, exist_ok=True)
  atomic_write.write(marker, json.dumps(want) + '\n')


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
  h = hashlib.sha1(f'{CACHE_VERSION}:{grid!r}'.encode())
  for f in (s.flair, s.wmh, s.brain):
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
    out['key'], out['source'] = str(out['key']), str(out['source'])
    return out
  out = subjects_lib.prepare_subject(s, grid)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write.write(path, lambda f: np.savez(f, **out))
  return out


def _prepare_to_cache(s, grid, workdir) -> None:
  prepare_cached(s, grid, workdir)  # a worker: the arrays stay on disk


def load_splits(config, workdir) -> tuple[list[dict], list[dict]]:
  """Prepared ``(train, val)`` subjects, split by subject within each site (or
  ``data.val_root``, ``data.val_sites``, ``data.val_ids`` held out)."""
  val_ids = tuple(config.data.get('val_ids', ()))
  if val_ids and config.data.val_sites:
    raise ValueError('data.val_ids and data.val_sites both set: give one of them')
  if val_ids and config.data.val_root and not config.data.tfds:
    raise ValueError(f'data.val_ids: the validation set is data.val_root='
                     f"{config.data.val_root}; set --config.data.val_root='' to "
                     'hold out subjects of data.root')
  if config.data.tfds:
    from wmh_jax import datasets  # pylint: disable=import-outside-toplevel
    logging.info('Reading %s (prepared once in %s) ...', config.data.tfds,
                 config.data.tfds_dir)
    train, val = datasets.load_prepared_splits(
        config.data.tfds, tuple(config.data.grid), config.data.tfds_dir,
        manual_dir=config.data.root, val_sites=tuple(config.data.val_sites))
    if val_ids:  # the two splits pooled, as with val_sites
      train, val = subjects_lib.split_by_ids(train + val, val_ids, lambda d: d['key'])
    return train, val
  if not str(config.data.root):
    raise ValueError('data.root is empty: give --config.data.root=DIR')
  root = ensure_synthetic(config)
  found = subjects_lib.find_subjects(root, config.data.missing_mask)
  if config.data.val_root:  # a separate validation set
    train = found
    val = subjects_lib.find_subjects(config.data.val_root, config.data.missing_mask)
    both = sorted({s.key for s in train} & {s.key for s in val})
    if both:
      raise ValueError(f'{config.data.val_root}: subjects also in {root} (a subject '
                       f'must not be trained and validated on): {", ".join(both)}')
    logging.info('Training on %d subjects in %s, validating on %d in %s '
                 '(data.val_root)', len(train), root, len(val), config.data.val_root)
  elif val_ids:  # named subjects held out (leave-one-out: bench/leave_one_out.py)
    train, val = subjects_lib.split_by_ids(found, val_ids)
    logging.info('Validating on %s (data.val_ids), training on the other %d',
                 ', '.join(s.key for s in val), len(train))
  else:
    train, val = subjects_lib.split_subjects(found, config.data.val_fraction,
                                             config.seed, config.data.val_sites)
  grid = tuple(config.data.grid)
  logging.info('Preparing %d subjects on the %s grid ...', len(train) + len(val), grid)
  todo = [(s, grid, Path(workdir)) for s in train + val
          if not _cache_path(Path(workdir), s, grid).exists()]
  if len(todo) > 1:  # decode the new ones in parallel; all are read back below
    _parallel_map(_prepare_to_cache, todo, 'prepared subject')
  prepared = [prepare_cached(s, grid, workdir) for s in train + val]
  return prepared[:len(train)], prepared[len(train):]
