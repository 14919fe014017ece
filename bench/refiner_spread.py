r"""How much a trained run's result moves with its refiner's subjects and draws.

  .venv/bin/python bench/refiner_spread.py --workdir=runs/default \
      [--data=/path/to/labelled_scans | --split=val] [--rotations=0,1,3,5] \
      [--seeds=0,1] [--set='refine.thresholds=(0.5,)' ...]

The refiner (``wmh_jax.refine``) is fitted on ``refine.num_subjects`` training
subjects spread evenly over the sorted list, with ``seed`` for its MLPs'
initialisation and sampling. Both choices move the real-scan result (stop 22:
which 12 subjects moved MS3SEG's Dice by up to 0.13; docs/results.md), so one
run's figure is one draw. For each rotation k (the training list rotated by k
places before the picks) and each seed s this script refits the refiner on the
run's U-Net exactly as training does (``train.refiner_cases``, ``refine.fit``
with the run's ``config.refine``, JAX's classic threefry as ``launch.py`` sets
it) and scores, as predict and evaluate do (``inference.segment``; the U-Net once a
scan, its refine step once a refit),

- the labelled scans of ``--data`` (challenge layout: ``SITE/ID/pre/FLAIR.nii.gz``
  and ``wmh.nii.gz``), or
- the run's own ``--split`` (``val`` or ``test``) when ``--data`` is not given.

It prints a row per refit and each metric's mean and range over them. Rotation 0
with the run's seed is the run's own refiner. ``--set=refine.KEY=VALUE`` refits
with another refiner setting on the same U-Net: a change to the refiner measured
over its spread, not on one draw. Nothing is written to the workdir;
the training subjects must be where the run found them (relative data folders
are taken from the folder it was trained in, as evaluate does).
"""

import ast
import dataclasses
import sys
import time
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, str(REPO))

from configs import default  # pylint: disable=g-import-not-at-top
from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import data
from wmh_jax import evaluate
from wmh_jax import inference
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import run_record
from wmh_jax import subjects
from wmh_jax import train

FLAGS = flags.FLAGS
SHOWN = challenge_metrics.METRICS


def _define_flags():  # not at import: the tests import this module
  flags.DEFINE_string('workdir', None, 'Trained run (config.json, checkpoint).')
  flags.DEFINE_string('data', '', 'Challenge-layout folder of labelled scans to '
                      "score ('': the run's --split).")
  flags.DEFINE_enum('split', 'val', ['val', 'test'], "The run's subjects scored "
                    'when --data is not given.')
  flags.DEFINE_list('rotations', ['0', '1', '3', '5'], 'Rotations of the '
                    'training list before the picks.')
  flags.DEFINE_list('seeds', [], "Refiner seeds (default: the run's seed).")
  flags.DEFINE_multi_string('set', [], 'refine.KEY=VALUE (a Python literal): '
                            "refit with this refiner setting instead of the run's, "
                            "e.g. --set='refine.thresholds=(0.5,)'. Repeatable.")
  flags.mark_flag_as_required('workdir')


def with_refine_settings(config, settings):
  """``config`` with ``refine.KEY=VALUE`` settings (Python literals) applied to
  its ``refine`` block: another refiner setting measured on the same U-Net.
  Only ``refine.*`` keys the config has, or the default config has (a run
  made before the key); the U-Net's are the checkpoint's. Raises ValueError,
  one line naming the setting."""
  config = config.copy_and_resolve_references()
  known = default.get_config().refine
  for setting in settings:
    key, eq, value = setting.partition('=')
    name = key.removeprefix('refine.')
    if not eq or name == key or name not in {*config.refine, *known}:
      raise ValueError(f'--set={setting}: not refine.KEY=VALUE with a KEY of '
                       f'config.refine ({", ".join(sorted({*config.refine, *known}))})')
    try:
      if name not in config.refine:
        with config.unlocked():
          config.refine[name] = known[name]
      config.refine[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError) as e:
      raise ValueError(f'--set={setting}: {value!r} is not a value for '
                       f'refine.{name} ({str(e).splitlines()[0]})') from None
  refine.check_rules(config.refine)      # a bad rule now, not after the U-Net
  return config


def rotated(train_set: list, k: int) -> list:
  """The training list rotated by ``k`` places: the refiner's picks from it are
  other subjects (rotation 0: the run's own)."""
  k %= max(len(train_set), 1)
  return list(train_set[k:]) + list(train_set[:k])


def folder_scans(root, config) -> list[tuple]:
  """``(key, ScanInput, labels)`` of every labelled subject under ``root``: the
  labels on the scan's canonical grid, as predict reads the scan."""
  out = []
  for s in subjects.find_subjects(root, missing_mask='skip'):
    scan = inference.read_scan(s.flair, config)
    out.append((s.key, scan, nifti_io.load_labels(s.wmh, scan.affine)))
  return out


def split_scans(prepared: list) -> list[tuple]:
  """``(key, ScanInput, prepared subject)`` of the run's prepared subjects."""
  return [(p['key'], inference.ScanInput(p['image'], p['native_shape'],
                                         p['spacing'], p['source']), p)
          for p in prepared]


def unrefined(segmenter, scans) -> list[tuple]:
  """``(key, ScanInput, labels, segmentation)`` of each ``(key, ScanInput,
  labels)``: the segmentation stopped before the refiner
  (``inference.segment(..., before_refine=True)``), the U-Net's part, run once."""
  return [(key, scan, truth, inference.segment(segmenter, scan, before_refine=True))
          for key, scan, truth in scans]


def score(segmenter, scans) -> list[dict]:
  """The challenge metrics of each scan's final mask: ``segmenter``'s refiner
  on the scan's segmentation stopped before it (:func:`unrefined`; so one
  U-Net pass serves every refit), against a folder's labels on
  the canonical grid, or a prepared subject's as evaluate scores it
  (``evaluate.case_row``)."""
  rows = []
  for key, scan, truth, before in scans:
    mask = inference.refine_segmentation(segmenter, before, scan.spacing).mask
    if isinstance(truth, dict):
      rows.append(evaluate.case_row(truth, mask))
    else:
      rows.append({'subject': key, **challenge_metrics.case_metrics(
          truth, mask, scan.affine)})
  return rows


def spread(config, train_set, model, state, scans, rotations, seeds, prior=None):
  """Yields ``(rotation, seed, refiner, rows)`` for every refit; blended with
  ``prior`` as training does (``train.prior_refiner``) when given."""
  base = inference.unet_segmenter(config, model, state)
  scans = unrefined(base, scans)
  step = int(state.step)
  for k in rotations:
    cases = train.refiner_cases(config, rotated(train_set, k), model, state, base)
    for seed in seeds:
      refiner = refine.fit(cases, config.refine, seed, step, prior)
      segmenter = dataclasses.replace(
          base, refiner=refiner,
          candidate=refine.candidate_of(refiner, config.refine.candidate))
      yield k, seed, refiner, score(segmenter, scans)


def run_config(workdir):
  """A trained run's config, its relative data folders taken from where it was
  trained, with ``launch.py``'s PRNG mode set; exits with a one-line error when
  ``workdir`` holds no ``config.json``."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_threefry_partitionable', False)  # as launch.py
  config = run_record.load_config(workdir)
  if config is None:
    sys.exit(f'error: {Path(workdir) / run_record.CONFIG}: no such file '
             '(not a trained run, or one made before config.json)')
  return run_record.with_absolute_data_paths(config, workdir)


def table(results) -> str:
  """One line a refit (its means over the scans), then each metric's mean and
  range over the refits."""
  head = f"{'rotation':>8} {'seed':>4} {'thr':>4} {'min mm3':>7} {'mm2':>4} " + ' '.join(
      f'{m:>13}' for m in SHOWN)
  lines, means = [head], []
  for k, seed, refiner, rows in results:
    m = [challenge_metrics.mean_and_count(rows, name)[0] for name in SHOWN]
    means.append(m)
    lines.append(f'{k:>8} {seed:>4} {float(refiner["threshold"]):>4.2f} '
                 f'{refine.min_lesion_of(refiner):>7g} {refine.min_area_of(refiner):>4g} ' +
                 ' '.join(f'{v:>13.3f}' for v in m))
  if means:
    a = np.asarray(means, np.float64)
    for label, v in (('mean', np.nanmean(a, 0)), ('min', np.nanmin(a, 0)),
                     ('max', np.nanmax(a, 0))):
      lines.append(f'{label:>8} {"":>4} {"":>4} {"":>7} {"":>4} ' +
                   ' '.join(f'{x:>13.3f}' for x in v))
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    seeds = [int(s) for s in FLAGS.seeds]
    rotations = [int(k) for k in FLAGS.rotations]
  except ValueError as e:
    sys.exit(f'error: --seeds and --rotations take integers ({e})')
  config = run_config(FLAGS.workdir)
  try:
    config = with_refine_settings(config, FLAGS.set)
  except ValueError as e:
    sys.exit(f'error: {e}')
  try:
    prior = train.prior_refiner(config)  # a fine-tune's refits blend as its own did
    scans = folder_scans(FLAGS.data, config) if FLAGS.data else None
    model, state = checkpoints.restore_weights(config, FLAGS.workdir)
    names = ('train',) if FLAGS.data else ('train', FLAGS.split)
    sets, _ = data.load_run_data(config, FLAGS.workdir, names)
    if scans is None:
      scans = split_scans(sets[FLAGS.split])
  except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
    sys.exit(f'error: {e}')
  if not scans:
    sys.exit(f'error: {FLAGS.data or FLAGS.split}: no labelled subject to score')
  seeds = seeds or [int(config.seed)]
  t0, results = time.time(), []
  for result in spread(config, sets['train'], model, state, scans, rotations,
                       seeds, prior):
    results.append(result)
    logging.info('refit %d/%d (rotation %d, seed %d) scored (%.0f s)',
                 len(results), len(rotations) * len(seeds), result[0], result[1],
                 time.time() - t0)
  print(f'{FLAGS.workdir}: refiner refitted on the U-Net of step {int(state.step)}'
        f'{" with " + ", ".join(FLAGS.set) if FLAGS.set else ""}, '
        f'{len(scans)} scans of {FLAGS.data or FLAGS.split} scored (means over them)')
  print(table(results))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
