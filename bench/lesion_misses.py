r"""Where a trained run loses the true lesions it misses, by lesion size.

  .venv/bin/python bench/lesion_misses.py --workdir=runs/default \
      [--data=/path/to/labelled_scans | --split=val] [--sizes=50,150] \
      [--levels=1e-5,1e-6,1e-7]

Each true lesion (label 1, 26-connected, as the challenge counts them) of the
scored scans gets one fate, from the run's segmentation as predict gives it:

- ``found``: the final mask touches it;
- ``no_candidate``: the U-Net gives every voxel of it less than the refiner's
  candidate level, so the refiner never decides it;
- ``below_threshold``: candidates, but the refiner keeps none of its voxels;
- ``dropped_small``: the refiner keeps some, but as a lesion smaller than the
  refiner's smallest kept (``refine.min_lesion_mm3``) or with a cross-section
  on a slice under its smallest (``refine.min_lesion_mm2``).

A run without a refiner has ``found`` and ``below_threshold`` (the U-Net's
``predict.threshold``) only. Per lesion size (mm^3, edges ``--sizes``) it prints
the count, each fate's share and the median of the U-Net's largest probability
in the lesion; then, for the lesions without a candidate, the share whose U-Net
maximum reaches each of ``--levels``: how many a lower ``refine.candidate``
would hand to the refiner (not whether the refiner would keep them; refit with
``bench/refiner_spread.py --set=refine.candidate=...`` for that). The scans
are read as ``bench/refiner_spread.py`` reads them; nothing is written.
"""

import sys
from pathlib import Path

from absl import app
from absl import flags
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, str(REPO))

from bench import refiner_spread  # pylint: disable=g-import-not-at-top
from wmh_jax import challenge_metrics
from wmh_jax import data
from wmh_jax import inference
from wmh_jax import refine

FLAGS = flags.FLAGS
FATES = ('found', 'no_candidate', 'below_threshold', 'dropped_small')


def _define_flags():  # not at import: the tests import this module
  flags.DEFINE_string('workdir', None, 'Trained run (config.json, checkpoint).')
  flags.DEFINE_string('data', '', 'Challenge-layout folder of labelled scans '
                      "('': the run's --split).")
  flags.DEFINE_enum('split', 'val', ['val', 'test'], "The run's subjects scored "
                    'when --data is not given.')
  flags.DEFINE_list('sizes', ['50', '150'], 'Edges (mm^3) of the lesion sizes.')
  flags.DEFINE_list('levels', ['1e-5', '1e-6', '1e-7'], 'U-Net probabilities '
                    'tried as lower candidate levels.')
  flags.mark_flag_as_required('workdir')


def lesion_fates(truth: np.ndarray, unet: np.ndarray, probability: np.ndarray,
                 mask: np.ndarray, spacing, candidate: float | None = None,
                 threshold: float | None = None) -> list[tuple[float, str, float]]:
  """``(volume mm^3, fate, U-Net maximum)`` of each true lesion of ``truth``.

  Args:
    truth: the true lesion mask on the scan's canonical grid.
    unet: the U-Net's probability there (``Segmentation.unet_probability``).
    probability: the final (refined) probability.
    mask: the final mask (``Segmentation.mask``).
    spacing: voxel size in mm.
    candidate: the refiner's candidate level; None without a refiner.
    threshold: the refiner's threshold (with ``candidate``).
  """
  labels, n = challenge_metrics.lesions(truth)
  if not n:
    return []
  volume = np.bincount(labels.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing))
  unet_max = np.asarray(ndimage.maximum(unet, labels, np.arange(1, n + 1)),
                        np.float64)

  def touched(m):
    return np.bincount(labels[m], minlength=n + 1)[1:] > 0

  found = touched(mask)
  if candidate is None:
    fates = np.where(found, 'found', 'below_threshold')
  else:
    # Compared in the probability's own dtype, as the refiner picks its
    # candidates (refine.features).
    decided = touched(np.asarray(unet) >= candidate)
    kept = touched(probability >= threshold)
    fates = np.where(found, 'found', np.where(
        ~decided, 'no_candidate',
        np.where(kept, 'dropped_small', 'below_threshold')))
  return [(float(v), str(f), float(u)) for v, f, u in zip(volume, fates, unet_max)]


def table(rows: list[tuple[float, str, float]], sizes, levels) -> str:
  """One line a size bucket (and one for all): count, each fate's share, the
  median U-Net maximum; then the no-candidate lesions' share at each level."""
  edges = [0.0, *sorted(float(s) for s in sizes), np.inf]
  head = (f"{'mm^3':>11} {'n':>5} " + ' '.join(f'{f:>15}' for f in FATES)
          + f" {'U-Net max':>9}  no_candidate >= " + ' '.join(f'{l:g}' for l in levels))
  lines = [head]
  buckets = [(f'{lo:g}-{hi:g}', lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
  for name, lo, hi in buckets + [('all', 0.0, np.inf)]:
    part = [r for r in rows if lo <= r[0] < hi]
    if not part:
      continue
    share = {f: np.mean([r[1] == f for r in part]) for f in FATES}
    missing = [r[2] for r in part if r[1] == 'no_candidate']
    reach = ' '.join(f'{np.mean(np.asarray(missing) >= l):.2f}' if missing else '-'
                     for l in levels)
    lines.append(f'{name:>11} {len(part):>5} '
                 + ' '.join(f'{share[f]:>15.2f}' for f in FATES)
                 + f' {np.median([r[2] for r in part]):>9.2g}  {reach}')
  return '\n'.join(lines)


def scan_fates(segmenter, scans) -> list[tuple[float, str, float]]:
  """The fates of every true lesion of ``scans`` (``refiner_spread``'s
  ``folder_scans`` or ``split_scans``): the U-Net once a scan, then its refiner
  as predict applies it."""
  rows = []
  refiner = segmenter.refiner
  for _, scan, truth, before in refiner_spread.unrefined(segmenter, scans):
    if isinstance(truth, dict):   # a prepared subject: its native labels
      truth = truth['native_labels']
    final = (before if refiner is None else
             inference.refine_segmentation(segmenter, before, scan.spacing))
    rows += lesion_fates(
        np.asarray(truth) == 1, before.unet_probability, final.probability,
        final.mask, scan.spacing,
        None if refiner is None else segmenter.candidate,
        None if refiner is None else float(refiner['threshold']))
  return rows


def main(argv):
  del argv
  try:
    sizes = [float(s) for s in FLAGS.sizes]
    levels = [float(s) for s in FLAGS.levels]
  except ValueError as e:
    sys.exit(f'error: --sizes and --levels take numbers ({e})')
  config = refiner_spread.run_config(FLAGS.workdir)
  try:
    segmenter = inference.load(config, FLAGS.workdir)
    if FLAGS.data:
      scans = refiner_spread.folder_scans(FLAGS.data, config)
    else:
      sets, _ = data.load_run_data(config, FLAGS.workdir, (FLAGS.split,))
      scans = refiner_spread.split_scans(sets[FLAGS.split])
  except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
    sys.exit(f'error: {e}')
  if not scans:
    sys.exit(f'error: {FLAGS.data or FLAGS.split}: no labelled subject to score')
  rows = scan_fates(segmenter, scans)
  refiner = segmenter.refiner
  print(f'{FLAGS.workdir}: {len(rows)} true lesions of {len(scans)} scans of '
        f'{FLAGS.data or FLAGS.split}; ' + (
            'no refiner (U-Net threshold '
            f'{segmenter.threshold:g})' if refiner is None else
            f'refiner candidates >= {segmenter.candidate:g}, threshold '
            f'{float(refiner["threshold"]):g}, smallest lesion kept '
            f'{refine.min_lesion_of(refiner):g} mm^3 and '
            f'{refine.min_area_of(refiner):g} mm^2 on a slice'))
  print(table(rows, sizes, levels))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
