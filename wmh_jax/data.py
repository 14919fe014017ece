"""The dataset of a run: make the synthetic data if needed, split, prepare, cache.

The split (train, val, test) is checked against ``WORKDIR/split.json`` when the
run has one (``wmh_jax.run_record``).

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
from wmh_jax import run_record
from wmh_jax import subjects as subjects_lib

CACHE_VERSION = 6  # bump when prepare_subject's output changes


def ensure_synthetic(config) -> Path:
  """Generates the synthetic data when it is missing and synthetic data is on.

  ``data.root`` gets ``data.num_subjects`` subjects of ``data.synthetic_seed``;
  ``data.val_root``, when set, ``data.num_val_subjects`` of ``data.val_synthetic_seed``
  (validation subjects from a seed training never sees); ``data.test_root``,
  when set, ``data.num_test_subjects`` of ``data.test_synthetic_seed`` (test
  subjects of a third seed). Returns ``data.root``.
  """
  root = Path(config.data.root)
  if not config.data.synthetic:
    return root
  from wmh_jax import synthetic  # pylint: disable=import-outside-toplevel
  sets = _synthetic_sets(config)
  for folder, seed, _ in sets:
    _check_marker(folder, seed, synthetic.GENERATOR_VERSION)
  args = [(str(folder), seed, i) for folder, seed, n in sets for i in range(n)
          if not (synthetic.subject_folder(folder, seed, i) / 'wmh.nii.gz').exists()]
  if args:
    logging.info('Generating %d synthetic subjects in %s ...', len(args),
                 ' and '.join(str(f) for f, _, _ in sets))
    _parallel_map(synthetic.write_one, args, 'synthetic subject')
  return root


def _synthetic_sets(config) -> list[tuple[Path, int, int]]:
  """``(folder, seed, count)`` of each synthetic folder the config names:
  ``data.root``, and ``data.val_root`` / ``data.test_root`` when set."""
  d = config.data
  sets = [(Path(d.root), d.synthetic_seed, d.num_subjects)]
  if d.val_root:
    sets.append((Path(d.val_root), d.val_synthetic_seed, d.num_val_subjects))
  if d.get('test_root', ''):
    sets.append((Path(d.test_root), d.test_synthetic_seed, d.num_test_subjects))
  return sets


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


def _cache_path(workdir: Path, s: subjects_lib.SubjectFiles, grid,
                depth=subjects_lib.FIXED_GRID) -> Path:
  key = f'{CACHE_VERSION}:{grid!r}'
  if depth[0]:  # a depth rule's key only with one: fixed-grid caches stay valid
    key += f':{tuple(depth)!r}'
  h = hashlib.sha1(key.encode())
  for f in (s.flair, s.wmh, s.brain):
    if f is not None:
      st = f.stat()
      h.update(f'{f.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode())
  return workdir / 'prepared' / f'{s.site.replace("/", "_")}_{s.id}_{h.hexdigest()[:12]}.npz'


def prepare_cached(s: subjects_lib.SubjectFiles, grid, workdir,
                   depth=subjects_lib.FIXED_GRID) -> dict:
  """``subjects.prepare_subject`` with an on-disk cache in ``workdir/prepared``
  (``depth``: ``subjects.depth_rule``)."""
  path = _cache_path(Path(workdir), s, grid, depth)
  if path.exists():
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
    # The FLAIR as this process names it: the cached name may be relative to
    # another folder (a run trained on a relative data.root, evaluated elsewhere).
    out['key'], out['source'] = str(out['key']), str(s.flair)
    return out
  out = subjects_lib.prepare_subject(s, grid, depth=depth)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write.write(path, lambda f: np.savez(f, **out))
  return out


def _prepare_to_cache(s, grid, workdir, depth) -> None:
  prepare_cached(s, grid, workdir, depth)  # a worker: the arrays stay on disk


def find_splits(config) -> dict[str, list[subjects_lib.SubjectFiles]]:
  """The subjects' files of ``train``, ``val`` and ``test`` (folders, not TFDS).

  Without ``data.val_root`` the subjects of ``data.root`` are split by
  ``subjects.split_subjects`` (a hash of ``data.split_seed`` and each key;
  ``data.val_sites`` or ``data.val_ids`` instead choose validation). With it,
  ``data.val_root`` is the validation set. ``data.test_fraction`` of
  ``data.root`` (by the same hash) and the subjects of ``data.test_root`` are
  the test set: never trained on, nothing chosen on them. With ``data.synthetic``
  each folder gives only the subjects the config asks for
  (:func:`_folder_subjects`). A file in two splits
  (compared resolved, so a folder inside another or a symlink counts) is refused.
  """
  d = config.data
  if not str(d.root):
    raise ValueError('data.root is empty: give --config.data.root=DIR')
  root = ensure_synthetic(config)
  found = _folder_subjects(config, root)
  split_seed, test_fraction = d.get('split_seed', 0), d.get('test_fraction', 0.0)
  val_ids = tuple(d.get('val_ids', ()))
  if d.val_root:  # a separate validation set
    train, _, test = subjects_lib.split_subjects(found, 0.0, split_seed,
                                                 test_fraction=test_fraction)
    val = _folder_subjects(config, d.val_root)
    _check_no_shared_keys(train, val, d.val_root, root)
  else:
    train, val, test = subjects_lib.split_subjects(
        found, d.val_fraction, split_seed, tuple(d.val_sites), test_fraction, val_ids)
  if d.get('test_root', ''):  # a separate test set
    extra = _folder_subjects(config, d.test_root)
    _check_no_shared_keys(train + val, extra, d.test_root, root)
    test = sorted(test + extra, key=lambda s: s.key)
  splits = {'train': train, 'val': val, 'test': test}
  check_no_shared_files(splits)
  return splits


def _folder_subjects(config, folder) -> list[subjects_lib.SubjectFiles]:
  """The subjects of ``folder``; with ``data.synthetic`` only the ``n`` the config
  asks for there (generator indices ``0 .. n-1`` of its seed:
  :func:`_synthetic_sets`), not every subject the folder holds.

  A folder is extended, never remade (``configs/long.py`` adds subjects to the
  main job's): without this, the main job run after it would train on the added
  subjects too, and its own run folder would no longer match its split.
  """
  found = subjects_lib.find_subjects(folder, config.data.missing_mask)
  if not config.data.synthetic:
    return found
  from wmh_jax import synthetic  # pylint: disable=import-outside-toplevel
  seed, n = next((s, k) for f, s, k in _synthetic_sets(config) if f == Path(folder))
  wanted = {synthetic.subject_folder('', seed, i).as_posix() for i in range(n)}
  kept = [s for s in found if s.key in wanted]
  lost = sorted(wanted - {s.key for s in kept})
  if lost:  # e.g. a FLAIR deleted by hand: its wmh.nii.gz stops the regeneration
    raise ValueError(f'{Path(folder) / lost[0]}: a synthetic subject the config asks '
                     f'for is incomplete ({len(lost)} of {n}); delete its folder to '
                     'generate it again')
  if len(kept) < len(found):
    logging.info('%s: %d of its %d synthetic subjects taken (the config asks for %d)',
                 folder, len(kept), len(found), n)
  return kept


def _check_no_shared_keys(train, other, other_root, root) -> None:
  both = sorted({s.key for s in train} & {s.key for s in other})
  if both:
    raise ValueError(f'{other_root}: subjects also in {root} (a subject must not be '
                     f'trained and validated or tested on): {", ".join(both)}')


def check_no_shared_files(splits: dict) -> None:
  """Refuses, naming the file, a FLAIR (resolved: links and nested folders
  followed) that is in two splits."""
  seen = {}
  for name, items in splits.items():
    for s in items:
      real = Path(s.flair).resolve()
      if real in seen and seen[real][0] != name:
        other, key = seen[real]
        raise ValueError(f'{real}: in {other} (as {key}) and in {name} (as {s.key}); '
                         'a subject must be in one split only')
      seen[real] = (name, s.key)


def _check_val_options(config) -> tuple:
  val_ids = tuple(config.data.get('val_ids', ()))
  if val_ids and config.data.val_sites:
    raise ValueError('data.val_ids and data.val_sites both set: give one of them')
  if val_ids and config.data.val_root and not config.data.tfds:
    raise ValueError(f'data.val_ids: the validation set is data.val_root='
                     f"{config.data.val_root}; set --config.data.val_root='' to "
                     'hold out subjects of data.root')
  return val_ids


def _tfds_splits(config, val_ids) -> dict[str, list[dict]]:
  from wmh_jax import datasets  # pylint: disable=import-outside-toplevel
  d = config.data
  logging.info('Reading %s (prepared once in %s) ...', d.tfds, d.tfds_dir)
  fields = {}
  if d.tfds.partition('/')[0] == 'wmh_challenge':  # the config's split, in its name
    fields = {'split_seed': int(d.get('split_seed', 0)),
              'val_fraction': float(d.val_fraction),
              'test_fraction': float(d.get('test_fraction', 0.0))}
  splits = datasets.load_prepared(d.tfds, tuple(d.grid), d.tfds_dir,
                                  manual_dir=d.root, val_sites=tuple(d.val_sites),
                                  **fields)
  if val_ids:  # the two splits pooled, as with val_sites
    splits['train'], splits['val'] = subjects_lib.split_by_ids(
        splits['train'] + splits['val'], val_ids, lambda x: x['key'])
  return splits


def load_run_data(config, workdir, names=('train', 'val', 'test')
                  ) -> tuple[dict[str, list[dict]], dict]:
  """The prepared subjects of the splits ``names`` (``{'train': [...], ...}``)
  and the split's record (``run_record.split_record``).

  The split is checked against ``WORKDIR/split.json`` when there, before any
  subject is prepared.
  """
  val_ids = _check_val_options(config)
  depth = subjects_lib.depth_rule(config)
  if config.data.tfds:
    if depth[0]:
      raise ValueError(f'data.grid_max_depth={depth[0]}: the TFDS datasets hold '
                       'one fixed grid; give --config.data.grid_max_depth=0 (every '
                       'scan on data.grid) or read the folders (data.tfds=\'\')')
    splits = _tfds_splits(config, val_ids)
    record = run_record.split_record(config, splits)
    run_record.check_split(workdir, record)
    return {n: splits[n] for n in names}, record
  files = find_splits(config)
  record = run_record.split_record(config, files)
  run_record.check_split(workdir, record,
                         {s.key: s for split in files.values() for s in split})
  logging.info('Split (data.split_seed=%s): %d train, %d validation, %d test subjects',
               config.data.get('split_seed', 0), *(len(files[n]) for n in
                                                    ('train', 'val', 'test')))
  chosen = [s for n in names for s in files[n]]
  grid = tuple(config.data.grid)
  logging.info('Preparing %d subjects on the %s grid%s ...', len(chosen), grid,
               f' (each its own slices, {grid[2]} to {depth[0]})' if depth[0] else '')
  todo = [(s, grid, Path(workdir), depth) for s in chosen
          if not _cache_path(Path(workdir), s, grid, depth).exists()]
  if len(todo) > 1:  # decode the new ones in parallel; all are read back below
    _parallel_map(_prepare_to_cache, todo, 'prepared subject')
  return {n: [prepare_cached(s, grid, workdir, depth) for s in files[n]]
          for n in names}, record


def load_splits(config, workdir) -> tuple[list[dict], list[dict]]:
  """Prepared ``(train, val)`` subjects (see :func:`load_run_data`)."""
  sets, _ = load_run_data(config, workdir, ('train', 'val'))
  return sets['train'], sets['val']


def load_split(config, workdir, name: str) -> list[dict]:
  """The prepared subjects of one split: ``'train'``, ``'val'`` or ``'test'``."""
  sets, _ = load_run_data(config, workdir, (name,))
  return sets[name]
