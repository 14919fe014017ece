"""Finding subjects in the challenge layout, splitting them, and preparing arrays.

Layout (the MICCAI 2017 WMH challenge): ``ROOT/SITE[/SCANNER]/ID/pre/FLAIR.nii.gz``
and ``ROOT/SITE[/SCANNER]/ID/wmh.nii.gz`` with labels 0 background, 1 WMH, 2 other
pathology; optionally ``ROOT/SITE[/SCANNER]/ID/brain.nii.gz``, a 0/1 brain mask
on the FLAIR's grid (the target of the U-Net's brain output). Preparation decodes
each NIfTI once, reorients it to RAS, z-scores it inside a brain (head) mask and
resizes it to the config grid with anti-aliasing; the training hot path then only
sees small arrays. With ``data.grid_max_depth`` a scan keeps its own slices:
its grid's depth is its slice count (:func:`scan_grid`), not ``data.grid``'s.
"""

import dataclasses
import hashlib
import math
import os
from pathlib import Path

from absl import logging
import numpy as np
from scipy import ndimage

from wmh_jax import nifti_io


@dataclasses.dataclass(frozen=True)
class SubjectFiles:
  site: str
  id: str
  flair: Path
  wmh: Path | None
  brain: Path | None = None   # ID/brain.nii.gz, when there

  @property
  def key(self) -> str:
    return f'{self.site}/{self.id}'


def find_subjects(root, missing_mask: str = 'skip') -> list[SubjectFiles]:
  """All subjects under ``root``, sorted by site then id.

  Symlinked folders are followed (a site or the whole dataset may be a link);
  a link back to a folder already walked is skipped.

  Args:
    root: the dataset folder.
    missing_mask: 'skip' (warn, listing them) or 'error' for subjects without
      ``wmh.nii.gz``; 'keep' returns them with ``wmh=None`` (for prediction).

  Raises:
    FileNotFoundError: when ``root`` is missing or holds no subject.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: dataset folder does not exist')
  found, missing = [], []
  for flair in _flair_files(root):
    folder = flair.parent.parent
    # root may be one subject's own folder (predict --input=ID/): its name is the ID.
    rel = folder.relative_to(root.parent if folder == root else root).parts
    site = '/'.join(rel[:-1]) or '.'
    wmh, brain = folder / 'wmh.nii.gz', folder / 'brain.nii.gz'
    s = SubjectFiles(site, rel[-1], flair, wmh if wmh.exists() else None,
                     brain if brain.exists() else None)
    if s.wmh is None and missing_mask != 'keep':
      missing.append(s.key)
      continue
    found.append(s)
  if missing:
    if missing_mask == 'error':
      raise FileNotFoundError(f'{root}: subjects without wmh.nii.gz: '
                              f'{", ".join(missing)}')
    logging.warning('%s: skipping %d subjects without wmh.nii.gz: %s', root,
                    len(missing), ', '.join(missing))
  if not found:
    raise FileNotFoundError(
        f'{root}: no subjects found (expected SITE/ID/pre/FLAIR.nii.gz with '
        'SITE/ID/wmh.nii.gz)')
  return found


def _flair_files(root: Path) -> list[Path]:
  """Every ``**/pre/FLAIR.nii.gz`` under ``root``, through symlinked folders
  (``Path.glob('**')`` does not follow them before Python 3.13), sorted; each
  real folder is walked once, so a link loop ends."""
  seen, out = set(), []
  for folder, dirs, files in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs.sort()
    if folder != str(root) and Path(folder).name == 'pre' and 'FLAIR.nii.gz' in files:
      out.append(Path(folder) / 'FLAIR.nii.gz')
  return sorted(out)


def split_unit(split_seed: int, key: str) -> float:
  """The subject's place in [0, 1): a hash of ``(split_seed, key)``, so a
  subject's split depends on nothing but its own key and the split seed."""
  digest = hashlib.sha256(f'{int(split_seed)}/{key}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0 ** 64


def split_subjects(items, val_fraction: float, split_seed: int, val_sites=(),
                   test_fraction: float = 0.0, val_ids=(),
                   key_of=lambda s: s.key, site_of=lambda s: s.site):
  """Splits by subject: no subject is in two of ``(train, val, test)``.

  Each subject is placed by ``u = split_unit(split_seed, key)``: ``u >= 1 -
  test_fraction`` is test, else ``u < val_fraction`` validation, else train.
  Adding or losing a subject therefore moves no other one, and the test
  subjects do not depend on how validation is chosen. Per-site counts are only
  approximately ``val_fraction`` (and ``test_fraction``) of each site.

  With ``val_sites`` (leave-site-out) the non-test subjects of those sites are
  validation; with ``val_ids`` the named subjects are (naming a test subject is
  refused). On a tiny dataset where the fractions give no validation (or no
  test) subject although the fraction is above 0, the train subject with the
  smallest ``u`` goes to validation (the one with the largest ``u`` to test),
  deterministically. Returns ``(train, val, test)``, each sorted by key.

  Raises:
    ValueError: fractions outside [0, 1] or summing above 1, unknown
      ``val_sites`` or ``val_ids``, a ``val_ids`` subject in test, or no
      subject left to train on.
  """
  if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1
          and val_fraction + test_fraction <= 1):
    raise ValueError(f'data.val_fraction={val_fraction}, data.test_fraction='
                     f'{test_fraction}: each must be in [0, 1] and their sum <= 1')
  items = sorted(items, key=key_of)
  u = {key_of(s): split_unit(split_seed, key_of(s)) for s in items}
  rest = [s for s in items if u[key_of(s)] < 1 - test_fraction]
  test = [s for s in items if u[key_of(s)] >= 1 - test_fraction]
  if test_fraction > 0 and not test and len(rest) > 2:
    last = max(rest, key=lambda s: u[key_of(s)])
    rest, test = [s for s in rest if s is not last], [last]
  if val_sites:
    train, val = split_by_sites(rest, val_sites, site_of)
  elif val_ids:
    in_test = {key_of(s) for s in test}
    for name in val_ids:
      hits = [k for k in in_test if str(name) in (k, k.rsplit('/', 1)[-1])]
      if hits:
        raise ValueError(f'data.val_ids: {name} is a test subject ({hits[0]}, '
                         'data.test_fraction); test subjects are never tuned on')
    train, val = split_by_ids(rest, val_ids, key_of)
  else:
    train, val = _hold_out(rest, lambda s: u[key_of(s)] < val_fraction)
    if val_fraction > 0 and not val and len(train) > 1:
      first = min(train, key=lambda s: u[key_of(s)])
      train, val = [s for s in train if s is not first], [first]
  if not train:
    raise ValueError(f'the split leaves no subject to train on ({len(val)} '
                     f'validation, {len(test)} test of {len(items)})')
  return train, val, test


def split_by_sites(items, val_sites, site_of=lambda s: s.site):
  """Leave-site-out: ``(train, val)``, the items of ``val_sites`` held out.

  Raises:
    ValueError: a site in ``val_sites`` has no items.
  """
  sites = {site_of(s) for s in items}
  unknown = sorted(set(val_sites) - sites)
  if unknown:
    raise ValueError(f'data.val_sites: no subjects of site(s) {", ".join(unknown)}'
                     f' (sites found: {", ".join(sorted(sites))})')
  return _hold_out(items, lambda s: site_of(s) in val_sites)


def split_by_ids(items, val_ids, key_of=lambda s: s.key):
  """Holds out the named subjects: ``(train, val)``, ``val`` exactly the items
  named in ``val_ids``, each by its SITE/ID key or, when unambiguous, its ID.

  Raises:
    ValueError: a name matches no item, or (a bare ID) several; or every item
      would be held out.
  """
  keys = [key_of(s) for s in items]
  chosen = set()
  for name in val_ids:
    hits = [k for k in keys if str(name) in (k, k.rsplit('/', 1)[-1])]
    if not hits:
      raise ValueError(f'data.val_ids: no subject {name} (ids found: '
                       f'{", ".join(keys)})')
    if len(hits) > 1:
      raise ValueError(f'data.val_ids: {name} names {len(hits)} subjects '
                       f'({", ".join(hits)}); give SITE/ID')
    chosen.add(hits[0])
  if len(chosen) == len(keys):
    raise ValueError(f'data.val_ids: holds out all {len(keys)} subjects; none left '
                     'to train on')
  return _hold_out(items, lambda s: key_of(s) in chosen)


def _hold_out(items, held_out):
  """``(train, val)``: the items for which ``held_out(item)`` is false, true."""
  return ([s for s in items if not held_out(s)], [s for s in items if held_out(s)])


def fill_holes(mask: np.ndarray, in_plane: bool = False) -> np.ndarray:
  """``ndimage.binary_fill_holes(mask)`` (its default structure), or with
  ``in_plane`` (a 3-D mask) that of every axial slice (axis 2) on its own,
  from one labelling of the background: a background component that reaches
  no face of the array (with ``in_plane``, no edge of its slice) is a hole.
  The same result as scipy's iterated dilation (tests/subjects_test.py) in a
  quarter to a third of its time on a brain-sized mask (docs/results.md)."""
  mask = np.asarray(mask, bool)
  if in_plane:
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    axes = (0, 1)
  else:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    axes = tuple(range(mask.ndim))
  background, n = ndimage.label(~mask, structure=structure)
  outside = np.zeros(n + 1, bool)
  for a in axes:
    outside[np.take(background, 0, axis=a)] = True
    outside[np.take(background, -1, axis=a)] = True
  outside[0] = False  # the mask itself
  return ~outside[background]


def head_mask(image: np.ndarray) -> np.ndarray:
  """Foreground (head or brain) mask: above 10% of the robust maximum, filled."""
  hi = np.percentile(image, 99.5)
  mask = image > 0.1 * hi
  mask = ndimage.binary_opening(mask, iterations=1)
  return fill_holes(mask) if mask.any() else image > image.min()


def zscore(image: np.ndarray, path='image', mask: np.ndarray | None = None
           ) -> np.ndarray:
  """Z-scores ``image`` with the mean and std of ``mask`` (the brain, when known:
  the same whether the scan shows the head or not), else of its foreground.

  In float64: float32 squares of intensities above ~1e19 overflow, which made
  the std infinite and every z-score 0 (an empty mask, silently).
  """
  image = np.asarray(image, np.float64)
  return zscored(image, zscore_stats(image, path, mask), path)


def zscored(image: np.ndarray, stats, path='image') -> np.ndarray:
  """``(image - mean) / std`` in float64, then float32, for ``stats = (mean,
  std)`` (:func:`zscore_stats`); refused in one line where not finite."""
  mean, std = stats
  return check_finite((np.asarray(image, np.float64) - mean) / std,
                      path).astype(np.float32)


def zscore_stats(image: np.ndarray, path='image', mask: np.ndarray | None = None
                 ) -> tuple[float, float]:
  """``(mean, std)`` that :func:`zscore` uses (float64): of ``mask`` when it
  holds 64 voxels or more, else of the head mask; refused in one line when the
  image is constant there."""
  image = np.asarray(image, np.float64)
  if mask is None or mask.sum() < 64:
    mask = head_mask(image)
  vals = image[mask]
  std = float(vals.std()) if vals.size else 0.0
  if std <= 1e-6 * max(1.0, abs(float(image.max()))):
    raise nifti_io.NiftiError(f'{path}: image is constant (nothing to segment)')
  return float(vals.mean()), std


def check_finite(volume: np.ndarray, path='image') -> np.ndarray:
  """``volume``, refused in one line when a value is NaN or infinite."""
  if not np.all(np.isfinite(volume)):
    raise nifti_io.NiftiError(f'{path}: intensities out of range (NaN or infinite '
                              'after z-scoring)')
  return volume


def resize(volume: np.ndarray, grid, order: int = 1) -> np.ndarray:
  """Resizes to ``grid``, voxel centres aligned, Gaussian anti-aliasing first."""
  factors = np.array(volume.shape) / np.array(grid)
  if order > 0:
    sigma = np.maximum((factors - 1) / 2, 0)
    if np.any(sigma > 0):
      volume = ndimage.gaussian_filter(volume, sigma, mode='nearest')
  # Output voxel i samples input position (i + 0.5) * factor - 0.5.
  coords = [(np.arange(g) + 0.5) * f - 0.5 for g, f in zip(grid, factors)]
  mesh = np.meshgrid(*coords, indexing='ij')
  return ndimage.map_coordinates(volume, mesh, order=order, mode='nearest')


def interpolate_linear(volume: np.ndarray, positions) -> np.ndarray:
  """Separable linear interpolation: output[i, j, k] samples ``volume`` at
  ``(positions[0][i], positions[1][j], positions[2][k])``, each clamped to the
  volume (``map_coordinates(order=1, mode='nearest')`` on a product grid).

  One axis at a time, as a product with a sparse-banded interpolation matrix
  (BLAS, float32): several times faster than ``map_coordinates`` or
  ``ndimage.zoom`` on a full native grid, the same values to ~1e-6.
  """
  out = volume.astype(np.float32)
  for axis, pos in enumerate(positions):
    m = volume.shape[axis]
    pos = np.clip(np.asarray(pos, np.float64), 0.0, m - 1.0)
    w = np.clip(1 - np.abs(pos[:, None] - np.arange(m)[None, :]), 0, None)
    out = np.moveaxis(np.tensordot(w.astype(np.float32), out, axes=([1], [axis])),
                      0, axis)
  return np.ascontiguousarray(out)


def resize_back(volume: np.ndarray, shape) -> np.ndarray:
  """Inverse geometry of :func:`resize`: grid -> native ``shape``, linear."""
  factors = np.array(shape) / np.array(volume.shape)
  return interpolate_linear(
      volume, [(np.arange(n) + 0.5) / f - 0.5 for n, f in zip(shape, factors)])


def lesion_fraction(labels: np.ndarray, grid) -> np.ndarray:
  """The share of each grid voxel that is lesion (label 1), anti-aliased."""
  return indicator_fraction(labels == 1, grid)


def indicator_fraction(indicator: np.ndarray, grid) -> np.ndarray:
  """The share of each grid voxel where ``indicator`` holds, anti-aliased."""
  return np.clip(resize(indicator.astype(np.float32), grid), 0.0, 1.0
                 ).astype(np.float32)


def labels_to_grid(labels: np.ndarray, grid, fraction: np.ndarray | None = None
                   ) -> np.ndarray:
  """Resizes labels by their smoothed indicators: lesion wins over other.

  ``fraction``: ``lesion_fraction(labels, grid)`` when the caller has it already.
  """
  if fraction is None:
    fraction = lesion_fraction(labels, grid)
  lesion = fraction >= 0.5
  other = resize((labels == 2).astype(np.float32), grid) >= 0.5
  return np.where(lesion, 1, np.where(other, 2, 0)).astype(np.uint8)


def preprocess(image: np.ndarray, grid, path='image',
               mask: np.ndarray | None = None) -> np.ndarray:
  """What every model input goes through: z-score in the head mask (in ``mask``,
  the brain, when given), resize to grid."""
  check_resamplable(image, path)
  return to_grid(zscore(image, path, mask), grid, path)


def check_resamplable(image: np.ndarray, path='image') -> None:
  """Refuses, in one line, an image that is not 3-D or is under 2 voxels along
  an axis (nothing to resample)."""
  if image.ndim != 3 or min(image.shape) < 2:
    raise nifti_io.NiftiError(f'{path}: image of shape {image.shape} is too '
                              'small to resample')


def rescore(grid_image: np.ndarray, stats, new_stats, path='image') -> np.ndarray:
  """``grid_image``, z-scored with ``stats`` (``(mean, std)``) and resized, as
  if z-scored with ``new_stats`` instead: z-scoring is affine and :func:`resize`
  keeps affine maps (its weights sum to 1), so ``preprocess(image, grid, path,
  mask)`` is ``rescore(preprocess(image, grid, path), zscore_stats(image),
  zscore_stats(image, path, mask))`` to float32 rounding, with one resize of
  the native volume instead of two."""
  (mean, std), (new_mean, new_std) = stats, new_stats
  if (mean, std) == (new_mean, new_std):
    return grid_image.copy()
  raw = grid_image.astype(np.float64) * std + mean
  return check_finite(((raw - new_mean) / new_std).astype(np.float32), path)


def to_grid(volume: np.ndarray, grid, path='image') -> np.ndarray:
  """A z-scored native volume on ``grid`` (float32), refused in one line when a
  value is not finite: the last step of :func:`preprocess`, and of inference's
  second pass on the FLAIR it has z-scored in the brain already."""
  return check_finite(resize(volume, grid).astype(np.float32), path)


# data.input_norm: what the U-Net's input is z-scored in. 'head': the head mask
# (one pass); 'brain': trained on both, and at inference a second pass on the
# scan z-scored in the brain the first pass found (inference.segment).
INPUT_NORMS = ('head', 'brain')


def input_norm(data_config) -> str:
  """``data.input_norm``, or ``'head'`` for a run made before the key."""
  norm = data_config.get('input_norm', 'head')
  if norm not in INPUT_NORMS:
    raise ValueError(f'data.input_norm: {norm!r} is not one of {INPUT_NORMS}')
  return norm


def brain_norm_fraction(data_config) -> float:
  """``data.brain_norm_fraction`` (the share of training crops z-scored in the
  brain), or 0.5 for a config made before the key; refused outside [0, 1]."""
  fraction = data_config.get('brain_norm_fraction', 0.5)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'data.brain_norm_fraction: {fraction!r} is not in [0, 1]')
  return fraction


# A scan's own depth is rounded up to a multiple of this (and of the network's
# pooling along Z), so that a handful of shapes is compiled, not one a count.
# Trained runs' inputs depend on it and config.json does not record it: never change.
DEPTH_STEP = 4
# A depth rule (:func:`depth_rule`) without a maximum: every scan on data.grid, as
# depth_rule's (0, step) for data.grid_max_depth=0 (a max_depth of 0 ignores the step).
FIXED_GRID = (0, 1)


def depth_rule(config) -> tuple[int, int]:
  """``(max_depth, step)`` of :func:`scan_grid` for ``config``:
  ``data.grid_max_depth`` (0, a config made before the key: every scan on
  ``data.grid``) and the multiple depths are rounded up to
  (:data:`DEPTH_STEP` and the product of ``model.pool_sizes`` along Z). A
  maximum below ``data.grid``'s depth or off that multiple is refused."""
  max_depth = int(config.data.get('grid_max_depth', 0) or 0)
  pool_z = math.prod(int(p[2]) for p in config.model.pool_sizes)
  step = math.lcm(DEPTH_STEP, pool_z)
  if max_depth:
    depth = int(config.data.grid[2])
    if depth % pool_z:
      raise ValueError(f'data.grid={tuple(config.data.grid)}: its depth must be a '
                       f'multiple of {pool_z} (model.pool_sizes along Z) with '
                       'data.grid_max_depth')
    if max_depth < depth or max_depth % step:
      raise ValueError(f'data.grid_max_depth={max_depth}: must be 0 or a multiple '
                       f'of {step} (the depth step and the pooling along Z) no '
                       f'smaller than data.grid\'s depth {depth}')
  return max_depth, step


def scan_grid(native_shape, grid, rule: tuple[int, int] = FIXED_GRID) -> tuple:
  """The grid a scan of ``native_shape`` (RAS) is resized to: ``grid``; with a
  ``rule`` ``(max_depth, step)`` whose max_depth is not 0 (:func:`depth_rule`),
  ``grid``'s X and Y and the scan's own slice count along Z rounded up to a
  multiple of ``step``, at least ``grid``'s depth and at most ``max_depth``.

  A 2-D FLAIR of 20 axial slices keeps them (on 16, a lesion on one slice is
  smeared over two grid slices); a 3-D scan gets ``max_depth``.
  """
  grid = tuple(int(g) for g in grid)
  max_depth, step = rule
  if not max_depth:
    return grid
  depth = -(-int(native_shape[2]) // step) * step
  return (*grid[:2], min(max(depth, grid[2]), max_depth))


def prepare_subject(s: SubjectFiles, grid, max_voxels: int | None = None,
                    depth: tuple[int, int] = FIXED_GRID) -> dict:
  """Decodes one subject and returns its grid arrays and native geometry.

  ``grid`` is the config's; the arrays' is :func:`scan_grid` of it, the scan's
  shape and ``depth`` (:func:`depth_rule`; the default keeps ``grid``).

  With a brain mask: ``brain_fraction`` (the share of each grid voxel inside the
  brain), ``native_brain`` (uint8 0/1) and ``image_brain`` (the FLAIR z-scored
  in that brain, on the grid); without one none of them is there.
  ``max_voxels``: the FLAIR's size limit (default ``nifti_io.MAX_VOXELS``).
  """
  image, affine = nifti_io.load_image(s.flair, max_voxels=max_voxels)
  check_resamplable(image, s.flair)
  grid = scan_grid(image.shape, grid, depth)
  head = zscore_stats(image, s.flair)
  out = {
      'key': s.key,
      'source': str(s.flair),
      'image': to_grid(zscored(image, head, s.flair), grid, s.flair),  # preprocess
      'native_shape': np.array(image.shape),
      'affine': affine,
      'spacing': voxel_spacing(affine),
  }
  if s.wmh is not None:
    labels = nifti_io.load_labels(s.wmh, affine, image.shape)
    out['lesion_fraction'] = lesion_fraction(labels, grid)
    out['labels'] = labels_to_grid(labels, grid, out['lesion_fraction'])
    out['native_labels'] = labels
  if s.brain is not None:
    brain = nifti_io.load_brain(s.brain, affine, image.shape)
    out['brain_fraction'] = indicator_fraction(brain == 1, grid)
    out['native_brain'] = brain
    # The input z-scored in the brain (data.input_norm='brain' trains on it):
    # preprocess(image, grid, s.flair, brain == 1), without resizing again.
    out['image_brain'] = rescore(out['image'], head,
                                 zscore_stats(image, s.flair, brain == 1), s.flair)
  return out


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
  """Voxel size (mm) along each array axis: the column norms of the affine."""
  return np.sqrt((affine[:3, :3] ** 2).sum(0))


def grid_spacing(prepared: dict) -> np.ndarray:
  """Physical size (mm) of one grid voxel of a prepared subject."""
  return (prepared['spacing'] * prepared['native_shape']
          / np.array(prepared['image'].shape))
