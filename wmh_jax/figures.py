"""Pictures for people: segmentation overlays and the synthetic contact sheet."""

import os
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _axial_slices(mask_like: np.ndarray, n: int) -> list[int]:
  """The ``n`` slices with the most lesion (spread over the volume if none)."""
  z = mask_like.shape[2]
  per_slice = mask_like.reshape(-1, z).sum(0)
  if per_slice.max() == 0:
    return list(np.linspace(z * 0.3, z * 0.7, n).astype(int))
  return sorted(np.argsort(per_slice)[::-1][:n].tolist())


def _save(fig, path):
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name('.' + path.name)
  fig.savefig(tmp, dpi=80, format='png')
  plt.close(fig)
  os.replace(tmp, path)


def overlay(path, image, pred=None, truth=None, title='', n_slices=4):
  """Axial slices of ``image`` (RAS) with ground truth (green) and prediction (red)."""
  ref = truth == 1 if truth is not None else pred
  zs = _axial_slices(ref if ref is not None else np.zeros(image.shape), n_slices)
  fig, axes = plt.subplots(1, len(zs), figsize=(3 * len(zs), 3.4))
  lo, hi = np.percentile(image, [1, 99.5])
  for ax, z in zip(np.atleast_1d(axes), zs):
    ax.imshow(image[:, :, z].T, cmap='gray', origin='lower', vmin=lo, vmax=hi)
    if truth is not None and (truth[:, :, z] == 1).any():
      ax.contour((truth[:, :, z] == 1).T, [0.5], colors='lime', linewidths=0.8)
    if pred is not None and pred[:, :, z].any():
      ax.contour(pred[:, :, z].T.astype(float), [0.5], colors='red', linewidths=0.8)
    ax.set_title(f'z={z}', fontsize=8)
    ax.axis('off')
  legend = ', '.join(name for name, shown in (('green: truth', truth is not None),
                                               ('red: prediction', pred is not None))
                     if shown)
  fig.suptitle(f'{title}  ({legend})' if legend else title, fontsize=9)
  _save(fig, path)


def contact_sheet(path, cases, n_slices=4):
  """One row per ``(title, image, labels)`` case, lesions outlined."""
  fig, axes = plt.subplots(len(cases), n_slices,
                           figsize=(2.6 * n_slices, 2.6 * len(cases)), squeeze=False)
  for row, (title, image, labels) in zip(axes, cases):
    zs = _axial_slices(labels == 1, n_slices)
    lo, hi = np.percentile(image, [1, 99.5])
    for ax, z in zip(row, zs):
      ax.imshow(image[:, :, z].T, cmap='gray', origin='lower', vmin=lo, vmax=hi,
                aspect='auto')
      for lab, color in ((1, 'red'), (2, 'cyan')):
        if (labels[:, :, z] == lab).any():
          ax.contour((labels[:, :, z] == lab).T, [0.5], colors=color,
                     linewidths=0.6)
      ax.set_title(f'{title} z={z}', fontsize=7)
      ax.axis('off')
  fig.suptitle('synthetic FLAIR (red: WMH, cyan: other pathology)', fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def activation_collage(path, rows, title='', slice_fraction=0.5):
  """Feature maps of a network, one figure row per ``(name, [(title, maps)])``.

  ``maps`` is ``(Z, X, Y, C)``; each tile shows, at the slice ``slice_fraction``
  of the way up, the channel whose activation varies most there.
  """
  n_cols = max(len(r[1]) for r in rows)
  fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 2.1 * len(rows)),
                           squeeze=False)
  for ax_row, (part, tiles) in zip(axes, rows):
    for k, ax in enumerate(ax_row):
      ax.axis('off')
      if k >= len(tiles):
        continue
      name, maps = tiles[k]
      z = min(int(slice_fraction * maps.shape[0]), maps.shape[0] - 1)
      plane = maps[z]
      c = int(np.argmax(plane.reshape(-1, plane.shape[-1]).var(0)))
      ax.imshow(plane[..., c].T, cmap='magma', origin='lower')
      ax.set_title(f'{part}: {name}\nchannel {c}', fontsize=6)
  fig.suptitle(f'{title}  post-ReLU feature maps (encoder row, decoder row)',
               fontsize=9)
  fig.tight_layout()
  _save(fig, path)
