"""Evaluation metrics on binary masks (numpy), label 2 ignored."""

import numpy as np


def dice(pred: np.ndarray, labels: np.ndarray) -> float:
  """Dice of ``pred`` (bool) against label 1, voxels labelled 2 masked out.

  Returns 1.0 when both are empty (nothing to find, nothing found).
  """
  valid = labels != 2
  p, g = pred.astype(bool) & valid, labels == 1
  denom = p.sum() + g.sum()
  return 1.0 if denom == 0 else float(2.0 * (p & g).sum() / denom)


def pooled_dice(preds, labels_list) -> float:
  """Dice over all voxels of all subjects together (the seed's 'total Dice')."""
  inter = denom = 0
  for p, l in zip(preds, labels_list):
    valid = l != 2
    p, g = p.astype(bool) & valid, l == 1
    inter += (p & g).sum()
    denom += p.sum() + g.sum()
  return 1.0 if denom == 0 else float(2.0 * inter / denom)


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
  """Volume of a boolean mask in mL from the voxel size of ``affine``."""
  return float(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)
