r"""wmh_jax entry point: flags -> config -> one call into wmh_jax.

Main job (train, then evaluate on held-out subjects):

  python launch.py --config=configs/default.py --workdir=runs/default

Other modes:

  python launch.py --workdir=runs/default --mode=evaluate
  python launch.py --config=configs/default.py --mode=synthesize --output=data/synth
  python launch.py --mode=predict --workdir=runs/default --input=scan.nii.gz --output=out
  python launch.py --mode=score --gt=data/synthetic --pred=runs/default/eval/pred
  python launch.py --config=configs/default.py --workdir=runs/x --config.train.num_steps=20

predict and evaluate read the workdir's own config (WORKDIR/config.json, written
by training) when no --config is given; --config.KEY=VALUE still overrides it,
except keys that would change the trained network (model.*, data.grid*): a
run trained before stop 36 (every scan on 128x128x16) is refused with
--config=configs/default.py (data.grid_max_depth=24), so omit --config there.
"""

import difflib
import importlib.util
import os
from pathlib import Path
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parent   # the project: configs/ and wmh_jax/
DEFAULT_WORKDIR = 'runs/default'
MODES = ('train_and_evaluate', 'train', 'evaluate', 'predict', 'score',
         'synthesize', 'benchmark')


def evaluate_splits(config, workdir, overwrite: bool, trained_step=None) -> dict:
  """Evaluates the validation subjects (``WORKDIR/eval``) and, when the run has
  test subjects, the test subjects (``WORKDIR/eval_test``); returns the summaries.

  ``trained_step`` (after training): a split already evaluated on that step is
  kept unless ``overwrite``; one of an older step is replaced.
  """
  from wmh_jax import data  # pylint: disable=g-import-not-at-top
  from wmh_jax import evaluate  # pylint: disable=g-import-not-at-top
  _, split = data.load_run_data(config, workdir, ())  # checks the recorded split
  summaries = {}
  for name in ('val', 'test'):
    if name == 'test' and not split['test']:
      continue
    if trained_step is None:
      summaries[name] = evaluate.evaluate(config, workdir, overwrite, split=name)
      continue
    done = evaluate.evaluated_step(workdir, name)
    if done == trained_step and not overwrite:
      print(f'evaluate: {workdir}/{evaluate.SPLITS[name][0]} already holds the '
            f'results of step {done} (pass --overwrite to evaluate again)', flush=True)
    else:  # the model is new since the last evaluation: replace it
      summaries[name] = evaluate.evaluate(config, workdir, True, split=name)
  return summaries


def named_config_keys(argv) -> set[str]:
  """The keys ``argv`` sets with ``--config.KEY=VALUE`` or ``--config.KEY VALUE``."""
  return {a.split('=', 1)[0][len('--config.'):] for a in argv
          if a.startswith('--config.')}


def check_trained_network(config, workdir, argv) -> None:
  """Refuses a config whose network is not the one trained in ``workdir``
  (``WORKDIR/config.json``; a run made before it existed is not checked)."""
  from wmh_jax import run_record  # pylint: disable=g-import-not-at-top
  trained = run_record.load_config(workdir)
  if trained is None:
    return
  change = run_record.first_frozen_change(trained, config)
  if change is None:
    return
  source = ('--config.' if change[0] in named_config_keys(argv)
            else f'--config={config_file(argv)}: ')
  run_record.check_same_network(trained, config, workdir, source)


def inherit_network(config, argv) -> None:
  """With ``train.init_from``, the network (``model.*`` but conv_impl and dtype,
  ``data.grid``: ``run_record.frozen``) comes from that run's config.json, but
  for the keys ``argv`` names (``--config.KEY=``): a fine-tune needs its
  source's architecture, whatever the config file's (configs/finetune.py)."""
  from wmh_jax import run_record  # pylint: disable=g-import-not-at-top
  source = config.train.get('init_from', '')
  trained = run_record.load_config(source) if source else None
  if trained is None:  # none, or a run made before config.json: as given
    return
  named = named_config_keys(argv)
  here = run_record.network(config)
  taken = {k: v for k, v in run_record.network(trained).items()
           if k in here and k not in named and v != here[k]}
  if taken:
    with config.unlocked():  # a key the config file predates is added (locked: KeyError)
      config.update_from_flattened_dict(taken)
    logging.info('train.init_from=%s: the network as trained there: %s', source,
                 ', '.join(f'{k}={v!r}' for k, v in sorted(taken.items())))


def _run(config):
  # Imported here so that --help and flag errors are instant.
  if config.data.get('max_voxels'):  # the size limit of every NIfTI this run reads
    from wmh_jax import nifti_io  # pylint: disable=g-import-not-at-top
    nifti_io.MAX_VOXELS = int(config.data.max_voxels)
  if FLAGS.mode == 'score':  # numpy and scipy only: no JAX or TensorFlow start-up
    from wmh_jax import score  # pylint: disable=g-import-not-at-top
    if not FLAGS.gt or not FLAGS.pred:
      raise FileNotFoundError('--mode=score needs --gt=DIR and --pred=DIR')
    score.score(FLAGS.gt, FLAGS.pred, FLAGS.output, overwrite=FLAGS.overwrite)
    return
  if FLAGS.mode in ('predict', 'evaluate'):  # before JAX starts: refused at once
    check_trained_network(config, FLAGS.workdir, sys.argv)
  if config.get('keep_freed_memory', False):  # before JAX and TF start threads
    from wmh_jax import host_memory  # pylint: disable=g-import-not-at-top
    if not host_memory.keep_freed_memory():
      logging.warning('keep_freed_memory: no glibc mallopt here; allocator unchanged')
  from wmh_jax import xla_flags  # pylint: disable=g-import-not-at-top
  if xla_flags.apply(config):  # XLA_FLAGS, read when XLA's CPU backend starts
    logging.warning('xla_cpu_onednn: oneDNN for XLA:CPU can deadlock a run (no CPU '
                    'used, no step logged; docs/results.md, stop 40)')
  import jax  # pylint: disable=g-import-not-at-top
  # --- Global JAX settings: here only, before any JAX randomness (issue 16) ---
  # The classic (non-partitionable) threefry: XLA:CPU compiles the partitionable
  # form of the initialisers' random draws ~10x slower (46 s vs 4.9 s for 20
  # normal draws; 45 s vs 8 s for the test network's first init). Parameters are
  # replicated, never sharded. tests/conftest.py sets the same.
  jax.config.update('jax_threefry_partitionable', False)
  # --- persistent compilation cache (issue 14: predict's cold start) ---
  # predict compiles the same network on every run: XLA's executables are kept
  # in --compilation_cache (default ~/.cache/wmh_jax/jax, under $XDG_CACHE_HOME
  # when set; '' turns it off), so a second run loads them instead.
  if FLAGS.mode == 'predict' and compilation_cache_dir():
    jax.config.update('jax_compilation_cache_dir', compilation_cache_dir())
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  # --- end of persistent compilation cache ---
  # --- end of global JAX settings ---
  if config.distributed:  # coordinator, process count and id from the environment
    jax.distributed.initialize()
  if FLAGS.mode in ('train', 'train_and_evaluate', 'synthesize', 'benchmark'):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], 'GPU')  # tf.data must not take GPU memory.
    except RuntimeError:  # TF already started in this process (tests): keep it
      pass
  logging.info('JAX devices: %s', jax.devices())
  if FLAGS.mode == 'synthesize':
    from wmh_jax import synthesize  # pylint: disable=g-import-not-at-top
    out = FLAGS.output or config.data.root
    synthesize.synthesize(config, out, overwrite=FLAGS.overwrite)
    return
  if FLAGS.mode in ('train', 'train_and_evaluate'):
    inherit_network(config, sys.argv)
    from wmh_jax import train  # pylint: disable=g-import-not-at-top
    state = train.train_and_evaluate(config, FLAGS.workdir)
  if FLAGS.mode == 'evaluate':
    evaluate_splits(config, FLAGS.workdir, FLAGS.overwrite)
  if FLAGS.mode == 'train_and_evaluate':
    evaluate_splits(config, FLAGS.workdir, FLAGS.overwrite, int(state.step))
  if FLAGS.mode == 'predict':
    from wmh_jax import predict  # pylint: disable=g-import-not-at-top
    predict.predict(config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                    overwrite=FLAGS.overwrite)
  if FLAGS.mode == 'benchmark':
    from wmh_jax import benchmark  # pylint: disable=g-import-not-at-top
    benchmark.benchmark(config)


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax (a dozen lines per checkpoint)."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or '/orbax/' not in record.pathname


def _config_keys(config) -> list[str]:
  """Every key a ``--config.KEY`` may name: the leaves (``run_record.flat``)
  and the sections above them, each section before its keys."""
  from wmh_jax import run_record  # pylint: disable=g-import-not-at-top
  keys = {}
  for leaf in run_record.flat(config):
    parts = leaf.split('.')
    keys.update(dict.fromkeys('.'.join(parts[:i]) for i in range(1, len(parts) + 1)))
  return list(keys)


def resolve_config_path(value: str) -> str:
  """``--config``'s PATH[:ARGS] with a relative PATH made absolute.

  ``configs/NAME.py`` is the project's own when it has that file (whatever the
  current folder holds); another relative PATH is taken from the current folder,
  else from the project. So every mode runs from any folder.
  """
  path, sep, args = value.partition(':')
  p = Path(path)
  if not path or p.is_absolute():
    return value
  own = [ROOT / p] if p.parts[0] == 'configs' else []
  for candidate in [*own, Path.cwd() / p, ROOT / p]:
    if candidate.is_file():
      return f'{candidate}{sep}{args}'
  return value


def resolve_config_argv(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config=PATH`` (or ``--config PATH``) resolved."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith('--config='):
      out[i] = '--config=' + resolve_config_path(a.split('=', 1)[1])
    elif a == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def _flag(argv, name: str, default=None):
  """The last value of ``--name=V`` or ``--name V`` in ``argv``, else ``default``."""
  value = default
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    elif a == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_file(argv) -> str:
  """``--config``'s value in ``argv`` (the default file when none)."""
  return _flag(argv, 'config', str(ROOT / 'configs' / 'default.py'))


def trained_config_argv(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=configs/trained.py:WORKDIR/config.json`` added for
  predict and evaluate without ``--config`` on a workdir that has one: the run's
  own config is the base, ``--config.KEY=VALUE`` overrides apply to it. A trained
  workdir without it (a run made before config.json was written) gets
  ``configs/seed_width.py``: the seed's full-width network, the default then."""
  if _flag(argv, 'mode') not in ('predict', 'evaluate') or _flag(argv, 'config'):
    return list(argv)
  workdir = Path(_flag(argv, 'workdir', DEFAULT_WORKDIR))
  saved = workdir / 'config.json'
  if saved.is_file():
    config = f'{ROOT / "configs" / "trained.py"}:{saved.resolve()}'
  elif (workdir / 'checkpoints').is_dir():
    config = str(ROOT / 'configs' / 'seed_width.py')
    print(f'{workdir} has no config.json (trained before it was written): '
          f'--config={config}, the network of the default then', file=sys.stderr)
  else:
    return list(argv)  # nothing trained there: the default config file
  return [argv[0], f'--config={config}', *argv[1:]]


if __name__ == '__main__':
  # Before the config flag is defined: without --config in argv it would load
  # the default file (and register its overrides) at definition.
  sys.argv = trained_config_argv(resolve_config_argv(sys.argv))
config_flags.DEFINE_config_file('config', str(ROOT / 'configs' / 'default.py'),
                                'Path to a config file (configs/NAME.py: the '
                                "project's own).", lock_config=True)
flags.DEFINE_string('workdir', DEFAULT_WORKDIR, 'Checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train_and_evaluate', MODES,
                  'What to do; the default trains, then evaluates.')
flags.DEFINE_string('output', None, 'Output folder (synthesize, predict, score).')
flags.DEFINE_multi_string('input', [], 'Input NIfTI files or folders (predict).')
flags.DEFINE_string('gt', None, 'Ground truth in the challenge layout (score).')
flags.DEFINE_string('pred', None, 'Predictions: ID/result.nii.gz or ID_wmh.nii.gz (score).')
flags.DEFINE_bool('overwrite', False, 'Replace existing output files.')
flags.DEFINE_string('compilation_cache', None,
                    'JAX persistent compilation cache folder (predict); default '
                    '~/.cache/wmh_jax/jax; empty: off.')


def compilation_cache_dir() -> str:
  """--compilation_cache, else $XDG_CACHE_HOME (or ~/.cache)/wmh_jax/jax."""
  if FLAGS.compilation_cache is not None:
    return FLAGS.compilation_cache
  base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
  return str(Path(base) / 'wmh_jax' / 'jax')


def check_config_overrides(argv) -> None:
  """Exits with one line naming the nearest valid keys for an unknown --config.KEY.

  (ml_collections refuses such keys too, but with a traceback.)
  """
  path = config_file(argv)
  file, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('_config_file', file)
  if spec is None or not os.path.isfile(file):
    print(f'error: --config={path}: no such config file', file=sys.stderr)
    sys.exit(2)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    keys = _config_keys(module.get_config(arg) if arg else module.get_config())
  except Exception as e:  # pylint: disable=broad-except
    print(error_line(e, f'--config={path}: '), file=sys.stderr)
    sys.exit(2)
  for a in argv[1:]:
    if a.startswith('--config.'):
      key = a[len('--config.'):].split('=', 1)[0]
      if key not in keys:
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6) or [
            k for k in keys if k.startswith(key.rsplit('.', 1)[0] + '.')][:6]
        print(f'error: --config.{key}: no such config key in {path}; nearest '
              f'valid keys: {", ".join(near) or "(none)"}', file=sys.stderr)
        sys.exit(2)


def error_line(e: BaseException, prefix: str = '') -> str:
  """``error: ...``, one line whatever ``e`` holds.

  Our refusals (bad input: NiftiError and CheckpointError are ValueErrors;
  missing or unwritable paths; a non-finite loss) are one line that names the
  path; anything else is named by its type, with its message's first line.
  """
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else ''
  if not isinstance(e, (OSError, ValueError, FloatingPointError)) or not text:
    text = text if len(text) <= 300 else text[:300] + '...'
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  if len(lines) > 1:
    text += ' [...] (--verbosity=1 shows all and the traceback)'
  return f'error: {prefix}{text}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_logger().addFilter(_QuietLibraries())
  try:
    _run(FLAGS.config)
  except KeyboardInterrupt:
    # Every output is written to a temporary name and renamed, and a checkpoint
    # being saved is finished first: what is there is whole.
    logging.debug('traceback', exc_info=True)
    print('interrupted: the files written so far are whole; a rerun with the same '
          'flags resumes training, and predict with --overwrite redoes the scans',
          file=sys.stderr, flush=True)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    # Every failure reaches the user as one line; the traceback is logged at
    # debug level (--verbosity=1 shows it).
    logging.debug('traceback', exc_info=True)
    print(error_line(e), file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  check_config_overrides(sys.argv)
  app.run(main)
