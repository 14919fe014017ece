"""What made a run: ``WORKDIR/config.json``, ``WORKDIR/split.json`` and
``WORKDIR/environment.json``.

Training writes the first two before its first step: the resolved config (read back as
an ``ml_collections.ConfigDict``, lists as tuples) and the exact split (split
seed and fractions; for train, val and test each subject's SITE/ID key with
the sha256 of its FLAIR and wmh files). A resumed run, ``--mode=evaluate`` and
``--mode=predict`` read them: predict needs only ``--workdir``; a config that
would change the trained network (its architecture or what it sees) is refused
naming the key, and so is a split that is not the recorded one, naming the
first subject that moved or whose file changed. Keys since removed from the
configs (:data:`OBSOLETE`) are dropped when an older config.json is read.

``environment.json`` says where and with what the numbers were computed: one
entry each time training starts or resumes (the step it starts from, the UTC
time, the CPU and device, the JAX backend, Python, the package versions, the
code's git commit and whether tracked files were modified, the environment
variables that change the numbers: ``machine.environment``), as process 0 of
a multi-host run sees them. The same config and seed give the same run on the
same machine and packages; another CPU or another jaxlib may round differently,
and this record says which machine and packages each run had.
"""

import datetime
import hashlib
import json
import os
from pathlib import Path

from absl import logging
import ml_collections

from wmh_jax import atomic_write
from wmh_jax import machine

CONFIG = 'config.json'
SPLIT = 'split.json'
ENVIRONMENT = 'environment.json'
SPLITS = ('train', 'val', 'test')
# Keys that fix the trained network: its architecture and its input. Compute
# choices that leave the parameters as they are may change.
FROZEN = ('model.', 'data.grid', 'data.input_norm')
NOT_FROZEN = ('model.conv_impl', 'model.dtype')
# Frozen keys that a config written before them lacks: the value such a run had
# (data.input_norm: one pass on the head-z-scored scan, subjects.input_norm;
# data.grid_max_depth: every scan on data.grid, subjects.depth_rule).
FROZEN_BEFORE_THE_KEY = {'data.input_norm': 'head', 'data.grid_max_depth': 0}
# Keys removed from the configs that older config.json files still hold: they
# are dropped on load (``drop_obsolete``), so that such a run still loads.
OBSOLETE = ('evaluate.threshold',   # predict.threshold serves evaluate too
            'predict.method', 'predict.spacing', 'predict.window',
            'predict.overlap')      # sliding_window: predict resizes to data.grid


class RunRecordError(ValueError):
  """A config or split that is not the one the run was trained with."""


# --- config.json ---------------------------------------------------------------

def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=1) + '\n'


def _tuples(value):
  """JSON's lists back to the tuples the configs use (every config sequence is one)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def drop_obsolete(saved: dict, path='config.json') -> dict:
  """``saved`` (a config.json's dict) without the keys of :data:`OBSOLETE`;
  warns when a dropped value made the run differ from what applies now."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  dropped = {}
  for key in OBSOLETE:
    section, name = key.split('.')
    if isinstance(out.get(section), dict) and name in out[section]:
      dropped[key] = out[section].pop(name)
  threshold = (out.get('predict') or {}).get('threshold')
  if dropped.get('evaluate.threshold', threshold) != threshold:
    logging.warning('%s: evaluate.threshold=%r is no longer a config key; '
                    'evaluate uses predict.threshold=%r', path,
                    dropped['evaluate.threshold'], threshold)
  if dropped.get('predict.method', 'resize') != 'resize':
    logging.warning('%s: predict.method=%r is no longer a config key; predict '
                    'resizes every scan to data.grid', path, dropped['predict.method'])
  return out


def config_from_json(text: str, path='config.json') -> ml_collections.ConfigDict:
  try:
    saved = json.loads(text)
    if not isinstance(saved, dict):
      raise ValueError(f'a JSON {type(saved).__name__}, not an object')
    return ml_collections.ConfigDict(_tuples(drop_obsolete(saved, path)))
  except ValueError as e:
    raise RunRecordError(f'{path}: not a saved config ({str(e).splitlines()[0]})'
                         ) from e


def load_config(workdir) -> ml_collections.ConfigDict | None:
  """``WORKDIR/config.json`` as a ConfigDict; None for a run made before it existed."""
  path = Path(workdir) / CONFIG
  if not path.is_file():
    return None
  return config_from_json(path.read_text(), path)


DATA_PATHS = ('root', 'val_root', 'test_root', 'tfds_dir')


def with_absolute_data_paths(config, workdir) -> ml_collections.ConfigDict:
  """``config`` with its relative ``data.*`` folders and ``train.init_from``
  taken from the folder the run was trained in (``split.json``'s ``cwd``), so
  that evaluate and the bench scripts run from any folder."""
  path = Path(workdir) / SPLIT
  cwd = json.loads(path.read_text()).get('cwd') if path.is_file() else None
  if not cwd:
    return config
  for key in DATA_PATHS:
    value = str(config.data.get(key, '') or '')
    if value and not Path(value).is_absolute():
      config.data[key] = str(Path(cwd) / value)
  source = str(config.get('train', {}).get('init_from', '') or '')
  if source and not Path(source).is_absolute():
    config.train.init_from = str(Path(cwd) / source)
  return config


def flat(config, prefix='') -> dict:
  """``{'model.encoder_filters': value, ...}`` of a ConfigDict or dict."""
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def frozen(key: str) -> bool:
  return key.startswith(FROZEN) and key not in NOT_FROZEN


def network(config) -> dict:
  """The keys of ``config`` that make its trained network (:func:`frozen`),
  flat, with lists as tuples; a key a config predates has the value its run
  had (:data:`FROZEN_BEFORE_THE_KEY`)."""
  out = {k: _tuples(v) for k, v in flat(config).items() if frozen(k)}
  return {**FROZEN_BEFORE_THE_KEY, **out}


def first_frozen_change(trained, config) -> tuple[str, object, object] | None:
  """``(key, trained value, new value)`` of the first key that changes the
  trained network, else None."""
  a, b = network(trained), network(config)
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
      return key, a.get(key), b.get(key)
  return None


def check_same_network(trained, config, workdir, source: str = '--config.') -> None:
  """Refuses, in one line naming the key, a ``config`` whose network (``model.*``
  but conv_impl and dtype, ``data.grid``, ``data.input_norm``) is not the one
  trained in ``workdir``.

  ``source``: how the key is named, e.g. ``'--config.'`` (an override) or
  ``'--config=FILE: '``.
  """
  change = first_frozen_change(trained, config)
  if change:
    key, was, now = change
    raise RunRecordError(f'{source}{key}: {workdir} was trained with {was!r}, not '
                         f"{now!r}; a trained model's architecture and "
                         'preprocessing cannot change')


# --- split.json ----------------------------------------------------------------

# File version (device, inode, size, mtime) -> sha256: a main job checks its split
# four times (training, then evaluate's two splits), ~5 s of hashing each time
# on a 2-core CPU. A file written since is another version and is hashed again.
_HASHES: dict[tuple, str] = {}


def sha256(path, chunk: int = 1 << 20) -> str:
  """The file's sha256, read once for each version of the file in a process."""
  st = os.stat(path)
  version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
  if version not in _HASHES:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(chunk), b''):
        h.update(block)
    _HASHES[version] = h.hexdigest()
  return _HASHES[version]


def _entry(s) -> dict:
  """One subject: its key, and for files on disk their sha256 (TFDS examples
  have no files: the key alone)."""
  if isinstance(s, dict):
    return {'key': s['key']}
  return {'key': s.key, 'flair': sha256(s.flair),
          'wmh': None if s.wmh is None else sha256(s.wmh)}


def split_record(config, splits: dict) -> dict:
  """The split as ``split.json`` holds it. ``splits``: ``{'train': [...], 'val':
  [...], 'test': [...]}`` of ``subjects.SubjectFiles`` (or TFDS dicts with a key)."""
  d = config.data
  return {
      'split_seed': int(d.get('split_seed', 0)),
      'val_fraction': float(d.val_fraction),
      'test_fraction': float(d.get('test_fraction', 0.0)),
      'val_root': str(d.val_root), 'test_root': str(d.get('test_root', '')),
      'val_sites': list(d.val_sites), 'val_ids': list(d.get('val_ids', ())),
      'tfds': str(d.tfds),
      'cwd': os.getcwd(),   # where the config's relative data paths start
      **{name: [_entry(s) for s in splits.get(name, [])] for name in SPLITS},
  }


def first_split_change(recorded: dict, current: dict, files: dict | None = None
                       ) -> str | None:
  """What differs first, in key order: a subject in another split (or gone, or
  new), else a file whose hash changed (named by its path when ``files``,
  ``{key: SubjectFiles}``, has it); None when the splits are the same."""
  def where(record):
    return {e['key']: (name, e) for name in SPLITS for e in record.get(name, [])}
  was, now = where(recorded), where(current)
  for key in sorted(set(was) | set(now)):
    a, b = was.get(key, ('no split', {})), now.get(key, ('no split', {}))
    if a[0] != b[0]:
      return (f'subject {key} was in {a[0]}, is now in {b[0]} (split seed '
              f'{recorded.get("split_seed")} recorded, {current.get("split_seed")} now)')
  for key in sorted(was):
    for kind in ('flair', 'wmh'):
      a, b = was[key][1].get(kind), now[key][1].get(kind)
      if a and b and a != b:
        name = getattr((files or {}).get(key), kind, None) or f'its {kind} file'
        return f'subject {key}: {name} changed since training (sha256 differs)'
  return None


def check_split(workdir, current: dict, files: dict | None = None) -> None:
  """Refuses a split that is not ``WORKDIR/split.json``'s (absent: nothing to
  check), in one line naming the first subject that moved or whose file changed."""
  path = Path(workdir) / SPLIT
  if not path.is_file():
    return
  try:
    recorded = json.loads(path.read_text())
  except ValueError as e:
    raise RunRecordError(f'{path}: unreadable ({str(e).splitlines()[0]})') from e
  change = first_split_change(recorded, current, files)
  if change is not None:
    raise RunRecordError(f'{path}: not the split this run was trained on: {change}')


# --- writing -------------------------------------------------------------------



def record(workdir, config, split: dict) -> None:
  """Writes ``config.json`` and ``split.json`` into a new run's ``workdir``; a run
  that has them keeps them (its network and split were checked against them)."""
  workdir = Path(workdir)
  trained = load_config(workdir)
  if trained is None:
    atomic_write.write(workdir / CONFIG, config_to_json(config))
  else:
    check_same_network(trained, config, workdir)
    a, b = flat(trained), flat(config)
    changed = [k for k in sorted(set(a) | set(b)) if _tuples(a.get(k)) != _tuples(b.get(k))]
    if changed:  # allowed (e.g. more steps), but said: config.json keeps the first
      logging.warning('%s: resumed with other values of %s than %s records', workdir,
                      ', '.join(changed), CONFIG)
  check_split(workdir, split)
  if not (workdir / SPLIT).is_file():
    atomic_write.write(workdir / SPLIT, json.dumps(split, indent=1) + '\n')


def record_environment(workdir, start_step: int, num_steps: int,
                       init_from: str = '') -> dict | None:
  """Appends this start's entry (:data:`ENVIRONMENT`, module docstring) to
  ``WORKDIR/environment.json`` and returns it. A file that cannot be read as
  such a record is kept as it is, with a warning, and nothing is written
  (None): the record is never worth a user's file or a training run."""
  path = Path(workdir) / ENVIRONMENT
  runs = []
  if path.exists():
    try:
      runs = json.loads(path.read_text())['runs']
      if not isinstance(runs, list):
        raise TypeError('runs is not a list')
    except (OSError, ValueError, KeyError, TypeError) as e:
      logging.warning('%s: not a readable environment record (%s); kept as it is, '
                      'this start is not recorded', path, e)
      return None
  entry = {'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec='seconds'),
           'start_step': int(start_step), 'num_steps': int(num_steps)}
  if init_from:
    entry['init_from'] = str(init_from)
  try:
    entry.update(machine.environment())
    atomic_write.write(path, json.dumps({'runs': [*runs, entry]}, indent=1) + '\n')
  except Exception as e:  # pylint: disable=broad-except  # a record, not the run
    logging.warning('%s: this start is not recorded (%s: %s)', path,
                    type(e).__name__, e)
    return None
  return entry
