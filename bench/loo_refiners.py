r"""Where a leave-one-out's error comes from: each fold's U-Net and refiners on
the scans it was fitted on and on the one it held out.

  .venv/bin/python bench/loo_refiners.py --loo=runs/loo [--prior=runs/default]

For every fold of ``bench/leave_one_out.py``'s ROOT (a folder with a
config.json) it segments the scans of the fold's ``data.root`` that its
``split.json`` recorded (its training and held-out subjects) as predict does
(the fold's own config, flips included) and scores each with

- ``unet``: the fold's U-Net alone (``predict.threshold``);
- ``own``: the fold's refiner, fitted on the fold's training scans (blended
  with its source run's when the fold's ``refine.prior_weight`` is above 0);
- ``prior``: the refiner of ``--prior`` (default: the run the fold was
  fine-tuned from, ``train.init_from``), fitted on that run's own subjects;
- ``mean``: the mean of ``own``'s and ``prior``'s refined probabilities (on
  blended folds, ``configs/finetune.py``'s since stop 37, that is 1/4 refit and
  3/4 prior).

``prior`` and ``mean`` keep the threshold and smallest lesion that the fold's
training scans choose, as ``refine.fit`` chooses them (the fold's
``refine.thresholds``, ``refine.min_lesion_mm3``, ``refine.min_lesion_mm2``
and rules), so the held-out
scan chooses nothing. Per scan it prints its Dice in the fold that held it out
beside its mean Dice in the folds that fitted on it: a part whose Dice falls
from the one to the other fits the scans it was fitted on, not the task. Then
the means over scans (held out: Dice and lesion F1). Nothing is written.
"""

import functools
import json
from pathlib import Path
import sys

from absl import app
from absl import flags
import numpy as np

from wmh_jax import challenge_metrics
from wmh_jax import inference
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import run_record
from wmh_jax import subjects

FLAGS = flags.FLAGS
PARTS = ('unet', 'own', 'prior', 'mean')


def _define_flags():  # not at import: the tests import this module beside launch.py
  flags.DEFINE_string('loo', None, "bench/leave_one_out.py's --workdir.")
  flags.DEFINE_string('prior', '', 'Run whose refiner is the prior ('
                      "'': each fold's train.init_from).")
  flags.mark_flag_as_required('loo')


def scores(labels: np.ndarray, mask: np.ndarray, spacing, min_lesion_mm3=0.0,
           min_lesion_mm2=0.0) -> tuple[float, float]:
  """``(Dice, lesion F1)`` of ``mask`` without its lesions under
  ``min_lesion_mm3`` or with a largest cross-section on a slice under
  ``min_lesion_mm2``, label 2 left out."""
  truth, pred = challenge_metrics.masked_pair(
      labels, challenge_metrics.drop_small_lesions(mask, spacing, min_lesion_mm3,
                                                   min_lesion_mm2))
  return challenge_metrics.dice(truth, pred), challenge_metrics.lesion_detection(
      truth, pred)[1]


def choose(cases, rc) -> tuple[float, float, float]:
  """``(threshold, smallest lesion mm^3, smallest cross-section mm^2)`` that
  ``cases`` (``(labels, refined probability, spacing)``) choose as
  ``refine.fit`` does: the threshold from their Dice (``refine.threshold_rule``),
  then the smallest lesion and cross-section on a slice from their mean of Dice
  and lesion F1 at it (``refine.pick_sizes``, as ``refine.fit``)."""
  by_t = {float(t): np.array([scores(l, p >= t, s)[0] for l, p, s in cases])
          for t in rc.thresholds}
  t = refine.pick(by_t, refine.threshold_rule(rc))
  v, a, _, _ = refine.pick_sizes([(p >= t, s, l) for l, p, s in cases], rc)
  return t, v, a


@functools.cache
def run_refiner(workdir: str) -> dict:
  """The refiner a trained run's predict applies (``inference.load``: that of its
  latest U-Net checkpoint); read once however many folds name the run."""
  config = run_record.load_config(workdir)
  refiner = None if config is None else inference.load(config, workdir).refiner
  if refiner is None:
    raise FileNotFoundError(f'{workdir}: no config.json or no refiner to use as the prior')
  return refiner


def fold_split(fold) -> tuple[list[str], list[str]]:
  """``(training keys, held-out keys)`` of a fold, as its ``split.json``
  recorded them when it trained (the ``train`` and ``val`` splits)."""
  path = Path(fold) / run_record.SPLIT
  if not path.exists():
    raise FileNotFoundError(f'{path}: missing (not a trained fold)')
  split = json.loads(path.read_text())
  train, held = ([e['key'] for e in split.get(name, [])] for name in ('train', 'val'))
  if not train or not held:
    raise ValueError(f'{path}: no training or no held-out subject')
  return train, held


def fold_scores(fold: Path, prior_dir: str) -> tuple[list[str], dict]:
  """``(held-out keys, {part: {scan key: (Dice, lesion F1)}})``: one fold's
  parts on the scans of its training and held-out splits."""
  config = run_record.load_config(fold)
  train, held = fold_split(fold)
  if not (prior_dir or config.train.get('init_from')):
    raise FileNotFoundError(f'{fold}: trained from scratch, no prior refiner '
                            '(pass --prior=WORKDIR)')
  prior = run_refiner(str(prior_dir or config.train.init_from))
  segmenter = inference.load(config, fold)
  candidate = refine.candidate_of(prior, config.refine.candidate)
  scans = {}
  found = {s.key: s for s in subjects.find_subjects(config.data.root)}
  for key in train + held:
    if key not in found:
      raise FileNotFoundError(f'{config.data.root}: no subject {key} (in {fold}/'
                              f'{run_record.SPLIT})')
    s = found[key]
    scan = inference.read_scan(s.flair, config)
    labels = nifti_io.load_labels(s.wmh, scan.affine, scan.native_shape)
    seg = inference.segment(segmenter, scan, before_refine=True)
    own = inference.refine_segmentation(segmenter, seg, scan.spacing)
    theirs = refine.refine(prior, seg.unet_probability, seg.flair_z, scan.spacing,
                           candidate)
    scans[key] = {
        'labels': labels, 'spacing': scan.spacing,
        'unet': seg.unet_probability >= segmenter.threshold, 'own': own.mask,
        'prior': theirs, 'mean': (own.probability + theirs) / 2}
  out = {}
  for part in PARTS:
    t, v, a = (choose([(scans[k]['labels'], scans[k][part], scans[k]['spacing'])
                       for k in train], config.refine)
               if part in ('prior', 'mean') else (None, 0.0, 0.0))
    out[part] = {k: scores(x['labels'], x[part] if t is None else x[part] >= t,
                           x['spacing'], v, a) for k, x in scans.items()}
  return held, out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  folds = sorted(p for p in Path(FLAGS.loo).iterdir()
                 if p.is_dir() and (p / run_record.CONFIG).exists())
  if not folds:
    print(f'error: {FLAGS.loo}: no fold folder with a {run_record.CONFIG}',
          file=sys.stderr)
    return 1
  held_out, trained_on = {p: {} for p in PARTS}, {p: {} for p in PARTS}
  for fold in folds:
    try:
      held, got = fold_scores(fold, FLAGS.prior)
    except (FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    for p in PARTS:
      for key, score in got[p].items():
        (held_out if key in held else trained_on)[p].setdefault(key, []).append(score)
    print(f'{fold.name}: held out {", ".join(held)}', flush=True)
  keys = sorted(held_out['unet'])
  print('Dice of each scan held out / its mean over the folds that fitted on it')
  print(f'{"scan":<20}' + ''.join(f' {p:>17}' for p in PARTS))
  def dice_of(scores_, key):  # mean over folds, NaN (no lesion) left out
    return np.nanmean(scores_.get(key, [(np.nan, np.nan)]), 0)
  for key in keys:
    print(f'{key.removeprefix("./"):<20}' + ''.join(
        f' {dice_of(held_out[p], key)[0]:>7.3f} / {dice_of(trained_on[p], key)[0]:>6.3f}'
        for p in PARTS))
  for p in PARTS:
    h = np.array([dice_of(held_out[p], k) for k in keys])
    t = [dice_of(trained_on[p], k)[0] for k in keys]
    print(f'{p:<6} held out: Dice {np.nanmean(h[:, 0]):.3f}, lesion F1 '
          f'{np.nanmean(h[:, 1]):.3f}; fitted on: Dice {np.nanmean(t):.3f}')
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
