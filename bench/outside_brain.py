r"""Lesion outside a scan's given brain mask: the truth's, and a prediction's.

  .venv/bin/python bench/outside_brain.py --data=/path/to/labelled_scans \
      [--pred=OUT]

For each scan of a challenge-layout folder that holds both ``wmh.nii.gz`` and
``brain.nii.gz`` it prints the true lesion (label 1) volume, the part of it
outside ``brain.nii.gz``, how many true lesions (26-connected, as the challenge
counts them) lie partly outside, and the median distance (mm) of those voxels
from the mask. With ``--pred`` (a ``--mode=predict`` output folder of the same
scans: ``NAME_wmh.nii.gz``) it adds the predicted volume outside the mask, split
into voxels on true lesion and false ones. A mask that leaves out part of the
brain (the cortex, the cerebellum) puts true lesion outside it: a prediction
that matched the truth exactly would have that much outside too. Nothing is
written.
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

from wmh_jax import challenge_metrics  # pylint: disable=g-import-not-at-top
from wmh_jax import metrics
from wmh_jax import nifti_io
from wmh_jax import predict
from wmh_jax import subjects

FLAGS = flags.FLAGS


def _define_flags():  # not at import: the tests import this module
  flags.DEFINE_string('data', None, 'Challenge-layout folder: SITE/ID/pre/FLAIR.nii.gz '
                      'with ID/wmh.nii.gz and ID/brain.nii.gz.')
  flags.DEFINE_string('pred', '', "--mode=predict's output folder for --data "
                      "('': the truth alone).")
  flags.mark_flag_as_required('data')


def outside(labels: np.ndarray, brain: np.ndarray, affine, pred=None) -> dict:
  """Volumes (mL) and counts of lesion outside ``brain`` on one scan.

  Args:
    labels: the manual labels (1 lesion; 2, other pathology, is not lesion).
    brain: the given brain mask (nonzero: brain), on the same grid.
    affine: the grid's voxel-to-world affine (mm).
    pred: a predicted lesion mask on the same grid, or None.
  """
  truth, brain = labels == 1, brain != 0
  out = truth & ~brain
  lesions, n = challenge_metrics.lesions(truth)
  dist = ndimage.distance_transform_edt(~brain, sampling=subjects.voxel_spacing(affine))
  ml = lambda mask: metrics.volume_ml(mask, affine)
  row = {'truth_ml': ml(truth), 'truth_outside_ml': ml(out),
         'lesions': n, 'lesions_partly_outside': len(np.unique(lesions[out])),
         'truth_outside_median_mm': float(np.median(dist[out])) if out.any() else 0.0}
  if pred is not None:
    p_out = (pred != 0) & ~brain
    row |= {'pred_outside_ml': ml(p_out), 'pred_outside_on_truth_ml': ml(p_out & truth),
            'pred_outside_false_ml': ml(p_out & ~truth)}
  return row


def rows(data, pred_dir='') -> list[tuple[str, dict]]:
  """``(name, outside(...))`` for every scan of ``data`` with a brain mask and
  labels, named as ``--mode=predict`` names its outputs.

  Raises:
    FileNotFoundError: ``data`` holds no such scan, or ``pred_dir`` lacks one's mask.
  """
  found = []
  for scan in predict.collect_inputs([data]):
    if scan.wmh is None or scan.brain is None:
      continue
    img = nifti_io.load(scan.flair)
    labels = nifti_io.load_labels(scan.wmh, img.affine, img.shape[:3])
    brain = nifti_io.load_brain(scan.brain, img.affine, img.shape[:3])
    pred = None
    if pred_dir:
      path = Path(pred_dir) / f'{scan.name}_wmh.nii.gz'
      if not path.is_file():
        raise FileNotFoundError(f'{path}: no predicted mask for {scan.flair}')
      pred = nifti_io.load_labels(path, img.affine, img.shape[:3])
    found.append((scan.name, outside(labels, brain, img.affine, pred)))
  if not found:
    raise FileNotFoundError(f'{data}: no scan with both wmh.nii.gz and brain.nii.gz')
  return found


def main(argv):
  del argv
  table = rows(FLAGS.data, FLAGS.pred)
  for name, r in table:
    line = (f'{name:<12} truth {r["truth_ml"]:6.2f} mL, {r["truth_outside_ml"]:5.2f} mL '
            f'outside the brain mask ({r["lesions_partly_outside"]} of {r["lesions"]} '
            f'lesions partly; median {r["truth_outside_median_mm"]:.1f} mm from it)')
    if 'pred_outside_ml' in r:
      line += (f' | predicted outside {r["pred_outside_ml"]:5.2f} mL: '
               f'{r["pred_outside_on_truth_ml"]:.2f} on true lesion, '
               f'{r["pred_outside_false_ml"]:.2f} false')
    print(line)
  keys = [k for k in table[0][1] if k.endswith('_ml')]
  print('mean         ' + ', '.join(f'{k} {np.mean([r[k] for _, r in table]):.2f}'
                                    for k in keys))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
