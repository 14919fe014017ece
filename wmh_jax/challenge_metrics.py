"""The five metrics of the WMH Segmentation Challenge, as its ``evaluation.py`` does.

Reference: Kuijf et al., IEEE TMI 2019, and the organisers' script
(github.com/hjkuijf/wmhchallenge, ``evaluation.py``), re-implemented here with
numpy/scipy instead of SimpleITK:

* ground truth = label 1; voxels labelled 2 are masked out of the prediction;
  the prediction is positive where >= 1 (integer arrays) or >= 0.5 (float);
* Dice of the two binary volumes (NaN when both are empty: the organisers'
  ``scipy.spatial.distance.dice`` gives 0/0 there);
* HD95 (mm): boundary = mask minus its in-plane 3x3x1 erosion (voxels on the
  image border are not eroded by the outside, as SimpleITK's default), in-plane
  meaning the FILE's first two axes (the challenge erodes the image as stored), voxel
  centres taken to world coordinates with the image affine, nearest-neighbour
  distances both ways, the larger of the two 95th percentiles; NaN when the
  prediction (or the ground truth) is empty;
* AVD (%) = |V_gt - V_pred| / V_gt * 100 (NaN when the ground truth is empty);
* lesion recall and F1 over 26-connected components: recall = ground-truth
  lesions touched by the prediction / all of them (1 when there are none);
  precision = predicted lesions touching the ground truth / all of them (1 when
  there are none); F1 their harmonic mean (0 when both are 0).

:func:`case_metrics` is the one implementation ``evaluate``, ``score`` and
``bench`` use: arrays on the file's own axes with the file's affine (never the
canonical RAS copy: the in-plane erosion would run along other axes on a
sagittal or coronal scan). :func:`summarize` gives each mean with the number of
cases it holds and why the others are undefined.
"""

import numpy as np
from scipy import ndimage
from scipy import spatial

from wmh_jax import metrics as metrics_lib

METRICS = ('dice', 'hd95_mm', 'avd_percent', 'lesion_recall', 'lesion_f1')
VOLUMES = ('true_volume_ml', 'pred_volume_ml')
_ERODE_2D = np.ones((3, 3, 1), bool)
_CONNECT_26 = np.ones((3, 3, 3), bool)


def binarize(pred: np.ndarray) -> np.ndarray:
  """The challenge's rule: >= 1 for integer and bool arrays, >= 0.5 for floats."""
  pred = np.asarray(pred)
  if pred.dtype == bool:
    return pred
  if np.issubdtype(pred.dtype, np.integer):
    return pred >= 1
  return pred >= 0.5


def masked_pair(labels: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(truth, prediction)`` booleans: truth = label 1, label-2 voxels removed."""
  labels = np.asarray(labels)
  if labels.shape != np.shape(pred):
    raise ValueError(f'prediction shape {np.shape(pred)} differs from the '
                     f'ground-truth shape {labels.shape}')
  return labels == 1, binarize(pred) & (labels != 2)


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
  denom = int(truth.sum()) + int(pred.sum())
  return float('nan') if denom == 0 else 2.0 * int((truth & pred).sum()) / denom


def _boundary_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
  eroded = ndimage.binary_erosion(mask, _ERODE_2D, border_value=1)
  idx = np.argwhere(mask & ~eroded).astype(np.float64)
  return idx @ affine[:3, :3].T + affine[:3, 3]


def hd95(truth: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> float:
  """95th-percentile Hausdorff distance in mm (world coordinates from ``affine``)."""
  if not pred.any() or not truth.any():
    return float('nan')
  a, b = _boundary_mm(truth, affine), _boundary_mm(pred, affine)
  d_ab = spatial.cKDTree(b, leafsize=100).query(a, k=1)[0]
  d_ba = spatial.cKDTree(a, leafsize=100).query(b, k=1)[0]
  return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def avd(truth: np.ndarray, pred: np.ndarray) -> float:
  """Absolute volume difference in percent of the true volume."""
  v_gt = int(truth.sum())
  if v_gt == 0:
    return float('nan')
  return abs(v_gt - int(pred.sum())) / v_gt * 100.0


def lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """26-connected components: ``(label array, count)``."""
  return ndimage.label(mask, structure=_CONNECT_26)


def bounding_box(mask: np.ndarray, margin=0) -> tuple[slice, ...] | None:
  """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (one
  number, or one per axis; clipped at 0, numpy clips the upper ends); None if
  ``mask`` is empty."""
  margins = np.broadcast_to(np.asarray(margin, int), (mask.ndim,))
  box = []
  for a in range(mask.ndim):
    hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
    if hit.size == 0:
      return None
    box.append(slice(max(int(hit[0]) - int(margins[a]), 0),
                     int(hit[-1]) + 1 + int(margins[a])))
  return tuple(box)


def slice_areas(cc: np.ndarray, n: int, spacing) -> np.ndarray:
  """Each lesion's largest cross-section (mm^2) on the scan's slices, for the
  label array ``cc`` of ``n`` lesions (:func:`lesions`; entry 0 is the
  background's). The slices are the planes across the coarsest axis (a
  thick-slice scan's slice axis; the first of equal ones), the area a rater
  sees a lesion by on the slice where it is largest."""
  ax = int(np.argmax(spacing))
  pixel = float(np.prod([s for k, s in enumerate(spacing) if k != ax]))
  depth = cc.shape[ax]
  plane = np.arange(depth).reshape([-1 if k == ax else 1 for k in range(cc.ndim)])
  counts = np.bincount((cc.astype(np.int64) * depth + plane).ravel(),
                       minlength=(n + 1) * depth)
  return counts.reshape(n + 1, depth).max(1) * pixel


def drop_small_lesions(mask: np.ndarray, spacing, min_mm3: float,
                       min_mm2: float = 0.0) -> np.ndarray:
  """``mask`` without its lesions (26-connected components, as :func:`lesions`
  counts them) of less than ``min_mm3`` (voxel size ``spacing`` in mm) or
  whose largest cross-section on a slice is less than ``min_mm2``
  (:func:`slice_areas`); ``mask`` itself when both are 0. The refiner's last
  step, and (by volume) the synthetic generator's rule for the lesions a rater
  marks."""
  if min_mm3 <= 0 and min_mm2 <= 0:
    return mask
  out = np.zeros(mask.shape, bool)
  # Labelled inside the mask's bounding box only: a few lesions in a large scan.
  box = bounding_box(mask)
  if box is None:
    return out
  cc, n = lesions(mask[box])
  size = np.bincount(cc.ravel(), minlength=n + 1) * float(np.prod(spacing))
  keep = size >= min_mm3
  if min_mm2 > 0:
    keep &= slice_areas(cc, n, spacing) >= min_mm2
  keep[0] = False
  out[box] = keep[cc]
  return out


def lesion_detection(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
  """``(recall, F1)`` of individual lesions (26-connected components)."""
  cc_truth, n_truth = lesions(truth)
  cc_pred, n_pred = lesions(pred)
  detected = np.unique(cc_truth[pred & (cc_truth > 0)]).size
  recall = 1.0 if n_truth == 0 else detected / n_truth
  hits = np.unique(cc_pred[truth & (cc_pred > 0)]).size
  precision = 1.0 if n_pred == 0 else hits / n_pred
  f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
  return float(recall), float(f1)


def challenge_metrics(labels: np.ndarray, pred: np.ndarray,
                      affine: np.ndarray) -> dict[str, float]:
  """All five metrics for one case. ``labels`` in {0,1,2}; ``pred`` any dtype;
  both on the axes of the file ``affine`` belongs to."""
  truth, p = masked_pair(labels, pred)
  recall, f1 = lesion_detection(truth, p)
  return {'dice': dice(truth, p), 'hd95_mm': hd95(truth, p, affine),
          'avd_percent': avd(truth, p), 'lesion_recall': recall, 'lesion_f1': f1}


def case_metrics(labels: np.ndarray, pred: np.ndarray,
                 affine: np.ndarray) -> dict[str, float]:
  """The five metrics (``METRICS``) and the true and predicted lesion volumes in
  mL (``VOLUMES``) of one case: ``labels`` ({0,1,2}) and ``pred`` on the FILE's
  own axes, ``affine`` that file's voxel-to-world matrix."""
  truth, p = masked_pair(labels, pred)
  return {**challenge_metrics(labels, pred, affine),
          'true_volume_ml': metrics_lib.volume_ml(truth, affine),
          'pred_volume_ml': metrics_lib.volume_ml(p, affine)}


def undefined_reason(row: dict) -> str:
  """Why a case's metric is NaN: an empty truth and/or prediction (read from the
  row's volumes), else 'undefined'."""
  true_v, pred_v = row.get('true_volume_ml'), row.get('pred_volume_ml')
  if true_v is None or pred_v is None:
    return 'undefined'
  empty = [w for w, v in (('truth', true_v), ('prediction', pred_v)) if float(v) == 0]
  return f'empty {" and ".join(empty)}' if empty else 'undefined'


def mean_and_count(rows: list[dict], key: str) -> tuple[float, int, dict[str, int]]:
  """``(mean, n, left_out)`` of ``row[key]`` over the rows where it is finite;
  ``left_out`` counts the others by :func:`undefined_reason` (a missing key is
  'not scored'). The mean is NaN when n is 0."""
  vals, left_out = [], {}
  for r in rows:
    v = r.get(key)
    if v is not None and np.isfinite(float(v)):
      vals.append(float(v))
    else:
      why = 'not scored' if v is None else undefined_reason(r)
      left_out[why] = left_out.get(why, 0) + 1
  return (float(np.mean(vals)) if vals else float('nan')), len(vals), left_out


def summarize(rows: list[dict]) -> dict:
  """Mean of each metric over the cases where it is defined (NaNs left out), with
  ``{metric}_n`` (how many cases that mean has) and ``{metric}_left_out`` (the
  others, counted by reason: ``{'empty prediction': 1}``)."""
  out = {}
  for m in METRICS:
    out[m], out[f'{m}_n'], out[f'{m}_left_out'] = mean_and_count(rows, m)
  return out


def count_note(n: int, total: int, left_out: dict[str, int] | None = None) -> str:
  """`` (n=4 of 5; 1 empty prediction)`` when a mean leaves cases out, else ''."""
  if n == total:
    return ''
  why = '; '.join(f'{k} {w}' for w, k in sorted((left_out or {}).items()))
  return f' (n={n} of {total}{"; " + why if why else ""})'


def summary_line(summary: dict, total: int) -> str:
  """``5 cases  Dice 0.700  HD95 18.10 mm (n=4 of 5; 1 empty prediction)  ...``:
  each mean with its count where it leaves cases out."""
  def part(name, key, fmt, unit=''):
    note = count_note(summary.get(f'{key}_n', total), total,
                      summary.get(f'{key}_left_out'))
    return f'  {name} {summary[key]:{fmt}}{unit}{note}'
  return (f'{total} cases' + part('Dice', 'dice', '.3f')
          + part('HD95', 'hd95_mm', '.2f', ' mm') + part('AVD', 'avd_percent', '.1f', ' %')
          + part('lesion recall', 'lesion_recall', '.3f')
          + part('lesion F1', 'lesion_f1', '.3f'))
