"""Pictures for people: segmentation overlays and the synthetic contact sheet."""

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from wmh_jax import atomic_write


def _axial_slices(mask_like: np.ndarray, n: int) -> list[int]:
  """The ``n`` slices with the most lesion (spread over the volume if none)."""
  z = mask_like.shape[2]
  per_slice = mask_like.reshape(-1, z).sum(0)
  if per_slice.max() == 0:
    return list(np.linspace(z * 0.3, z * 0.7, n).astype(int))
  return sorted(np.argsort(per_slice)[::-1][:n].tolist())


def _save(fig, path, dpi=80):
  """Writes ``fig`` as a PNG at ``path`` (atomically) and closes it."""
  try:
    atomic_write.write(path, lambda f: fig.savefig(f, dpi=dpi, format='png'))
  finally:
    plt.close(fig)


def overlay_slices(z: int, n: int, extent=None, keep=()) -> list[int]:
  """``n`` axial slices evenly spaced over ``extent`` (first, last; default the
  middle 80 % of the ``z`` slices), the slices in ``keep`` replacing the nearest
  of them. Sorted, without repeats (fewer when the extent is short)."""
  lo, hi = extent if extent is not None else (round(0.1 * (z - 1)), round(0.9 * (z - 1)))
  zs = [int(round(v)) for v in np.linspace(lo, hi, n)]
  for k in dict.fromkeys(int(k) for k in keep):
    if k in zs:
      continue
    free = [i for i, v in enumerate(zs) if v not in keep]
    if free:
      zs[min(free, key=lambda i: abs(zs[i] - k))] = k
  return sorted(set(zs))


def _most(mask) -> list[int]:
  """The slice with the most of ``mask`` (none if empty)."""
  if mask is None or not mask.any():
    return []
  return [int(np.argmax(mask.reshape(-1, mask.shape[2]).sum(0)))]


# Overlays: panels in rows of OVERLAY_COLUMNS, each drawn at one screen pixel
# per voxel of the slice's longer side (PANEL_PX, between its bounds), so that a
# lesion of a few voxels stays visible (at 80 dpi and 3 inches a panel, a
# 256-voxel slice had ~160 pixels).
OVERLAY_COLUMNS = 6
PANEL_PX = (256, 512)
OVERLAY_DPI = 100


def overlay(path, image, pred=None, truth=None, title='', n_slices=12, brain=None):
  """Axial slices of ``image`` (RAS) with ground truth (green), prediction (red)
  and the brain mask's edge (yellow).

  The slices are spread evenly over the brain's z-extent (over the volume's
  middle without a brain mask); the slices with the most predicted and the most
  true lesion are always among them. Rows of :data:`OVERLAY_COLUMNS` panels, each
  at about one pixel per voxel (:data:`PANEL_PX`).
  """
  lesion = truth == 1 if truth is not None else None
  extent = None
  if brain is not None and brain.any():
    zs_brain = np.flatnonzero(brain.reshape(-1, brain.shape[2]).any(0))
    extent = (int(zs_brain[0]), int(zs_brain[-1]))
  zs = overlay_slices(image.shape[2], n_slices, extent, _most(pred) + _most(lesion))
  cols = min(len(zs), OVERLAY_COLUMNS)
  rows = -(-len(zs) // cols)
  nx, ny = image.shape[:2]
  panel = min(max(max(nx, ny), PANEL_PX[0]), PANEL_PX[1]) / OVERLAY_DPI  # inches
  head = 0.35  # inches above the panels for the title
  fig, axes = plt.subplots(rows, cols, squeeze=False,
                           figsize=(cols * panel, rows * (panel + 0.2) + head))
  fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, wspace=0.02,
                      hspace=0.2 / panel, top=1 - head / fig.get_figheight())
  lo, hi = np.percentile(image, [1, 99.5])
  drawn = set()
  for ax in axes.flat[len(zs):]:
    ax.axis('off')
  for ax, z in zip(axes.flat, zs):
    ax.imshow(image[:, :, z].T, cmap='gray', origin='lower', vmin=lo, vmax=hi,
              interpolation='nearest')
    for name, mask, color in (('yellow: brain', brain, 'yellow'),
                              ('green: truth', lesion, 'lime'),
                              ('red: prediction', pred, 'red')):
      if mask is not None and mask[:, :, z].any():
        ax.contour(mask[:, :, z].T.astype(float), [0.5], colors=color,
                   linewidths=0.6 if color == 'yellow' else 0.8)
        drawn.add(name)
    ax.set_title(f'z={z}', fontsize=8, pad=2)
    ax.axis('off')
  legend = ', '.join(n for n in ('green: truth', 'red: prediction', 'yellow: brain')
                     if n in drawn)
  fig.suptitle(f'{title}  ({legend})' if legend else title, fontsize=9,
               y=1 - 0.05 / fig.get_figheight(), va='top')
  _save(fig, path, OVERLAY_DPI)


def contact_sheet(path, cases, n_slices=4):
  """One row per ``(title, image, labels[, brain])`` case, lesions outlined (and
  the brain mask's edge when given)."""
  fig, axes = plt.subplots(len(cases), n_slices,
                           figsize=(2.6 * n_slices, 2.6 * len(cases)), squeeze=False)
  any_brain = False
  for row, (title, image, labels, *rest) in zip(axes, cases):
    brain = rest[0] if rest else None
    zs = _axial_slices(labels == 1, n_slices)
    lo, hi = np.percentile(image, [1, 99.5])
    for ax, z in zip(row, zs):
      ax.imshow(image[:, :, z].T, cmap='gray', origin='lower', vmin=lo, vmax=hi,
                aspect='auto')
      if brain is not None and brain[:, :, z].any():
        ax.contour(brain[:, :, z].T.astype(float), [0.5], colors='yellow',
                   linewidths=0.5)
        any_brain = True
      for lab, color in ((1, 'red'), (2, 'cyan')):
        if (labels[:, :, z] == lab).any():
          ax.contour((labels[:, :, z] == lab).T, [0.5], colors=color,
                     linewidths=0.6)
      ax.set_title(f'{title} z={z}', fontsize=7)
      ax.axis('off')
  fig.suptitle('synthetic FLAIR (red: WMH, cyan: other pathology'
               + (', yellow: brain' if any_brain else '') + ')', fontsize=9)
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
