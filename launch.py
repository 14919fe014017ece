r"""wmh_jax entry point: flags -> config -> one call into wmh_jax.

Main job (train, then evaluate on held-out subjects):

  python launch.py --config=configs/default.py --workdir=runs/default

Other modes:

  python launch.py --config=configs/default.py --workdir=runs/default --mode=evaluate
  python launch.py --config=configs/default.py --mode=synthesize --output=data/synth
  python launch.py --config=configs/default.py --workdir=runs/x --config.train.num_steps=20
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ('train_and_evaluate', 'train', 'evaluate', 'predict', 'score',
         'synthesize', 'benchmark')
config_flags.DEFINE_config_file('config', 'configs/default.py',
                                'Path to a config file.', lock_config=True)
flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train_and_evaluate', MODES,
                  'What to do; the default trains, then evaluates.')
flags.DEFINE_string('output', None, 'Output folder (synthesize, predict).')
flags.DEFINE_multi_string('input', [], 'Input NIfTI files or folders (predict).')
flags.DEFINE_bool('overwrite', False, 'Replace existing output files.')


def _run(config):
  # Imported here so that --help and flag errors are instant.
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TF must not take GPU memory.
  logging.info('JAX devices: %s', jax.devices())
  if FLAGS.mode == 'synthesize':
    from wmh_jax import synthesize  # pylint: disable=g-import-not-at-top
    out = FLAGS.output or config.data.root
    synthesize.synthesize(config, out, overwrite=FLAGS.overwrite)
    return
  if FLAGS.mode in ('train', 'train_and_evaluate'):
    from wmh_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, FLAGS.workdir)
  if FLAGS.mode in ('evaluate', 'train_and_evaluate'):
    from wmh_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, FLAGS.workdir)
  if FLAGS.mode in ('predict', 'score', 'benchmark'):
    raise NotImplementedError(f'--mode={FLAGS.mode} is not implemented yet')


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax (a dozen lines per checkpoint)."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_logger().addFilter(_QuietLibraries())
  from wmh_jax import nifti_io  # pylint: disable=g-import-not-at-top
  try:
    _run(FLAGS.config)
  except (nifti_io.NiftiError, FileNotFoundError, FileExistsError,
          PermissionError, FloatingPointError, NotImplementedError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
