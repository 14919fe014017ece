"""NIfTI in and out: the only module that imports nibabel.

Every loader returns arrays in the closest canonical (RAS+) orientation, so that
axis 0 runs left->right, axis 1 posterior->anterior and axis 2 inferior->superior
(the slice axis of an axial acquisition) whatever the file's own orientation.
"""

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from wmh_jax import atomic_write

# The most voxels a file may declare, checked from its header before any data are
# read: a 2 MB .nii.gz can decompress to gigabytes, and a volume is decoded into
# memory as float32 and z-scored in float64. 512^3 (~134 M) is well above any
# FLAIR; ``--config.data.max_voxels`` (launch.py sets this for the run) or the
# environment variable raises it for every mode, ``max_voxels`` per call.
MAX_VOXELS = int(os.environ.get('WMH_JAX_MAX_VOXELS', 512 ** 3))


class NiftiError(ValueError):
  """A file that cannot be used, with the path and the reason in the message."""


def check_header(img, path, max_voxels: int | None = None) -> None:
  """Refuses, before the data are read, what no loader here can use: too many
  voxels, RGB (structured) or complex voxels, a singular or non-finite affine."""
  limit = MAX_VOXELS if max_voxels is None else int(max_voxels)
  shape = tuple(int(n) for n in img.shape)
  voxels = int(np.prod(shape, dtype=np.int64))
  if voxels > limit:
    raise NiftiError(f'{path}: shape {shape} is {voxels:,} voxels, more than the '
                     f'limit of {limit:,} (--config.data.max_voxels raises it)')
  dtype = img.get_data_dtype()
  if dtype.names is not None:
    raise NiftiError(f'{path}: RGB or structured voxels ({", ".join(dtype.names)}); '
                     'expected one intensity a voxel')
  if dtype.kind == 'c':
    raise NiftiError(f'{path}: complex voxels ({dtype}); expected real intensities '
                     '(e.g. the magnitude image)')
  axes = None if img.affine is None else np.asarray(img.affine, float)[:3, :3]
  # Singular: a voxel axis of length 0 or in the plane of the other two.
  if (axes is None or not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(
      axes)) <= 1e-6 * np.prod(np.linalg.norm(axes, axis=0))):
    raise NiftiError(f'{path}: the voxel-to-world affine is singular or not finite '
                     f'(voxel axes {None if axes is None else axes.T.round(3).tolist()})'
                     '; cannot orient the image')


def load(path: str | os.PathLike, canonical: bool = True,
         max_voxels: int | None = None) -> nib.Nifti1Image:
  """Reads a 3-D NIfTI (a 4-D file with one volume is accepted).

  Raises:
    NiftiError: naming the file when it is missing, unreadable, not 3-D, or
      refused by :func:`check_header` (``max_voxels``: default ``MAX_VOXELS``).
  """
  path = Path(path)
  if not path.is_file():
    raise NiftiError(f'{path}: no such file')
  try:
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      raise NiftiError(f'{path}: not a NIfTI image')
    check_header(img, path, max_voxels)
    data = np.asanyarray(img.dataobj)  # decode now, so corrupt files fail here
  except NiftiError:
    raise
  except Exception as e:  # nibabel and gzip raise many types for broken files.
    raise NiftiError(f'{path}: cannot read NIfTI ({type(e).__name__}: {e})') from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise NiftiError(f'{path}: expected a 3-D image, got shape {data.shape}')
  img = nib.Nifti1Image(data, img.affine, img.header if isinstance(
      img, nib.Nifti1Image) else None)
  return nib.as_closest_canonical(img) if canonical else img


def load_image(path, canonical: bool = True, max_voxels: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(float32 array, 4x4 affine)``; refuses non-finite voxels."""
  img = load(path, canonical, max_voxels)
  data = np.asarray(img.get_fdata(dtype=np.float32))
  if not np.all(np.isfinite(data)):
    raise NiftiError(f'{path}: image has NaN or infinite voxels')
  return data, img.affine


def load_labels(path, like_affine: np.ndarray | None = None,
                like_shape: tuple[int, ...] | None = None,
                canonical: bool = True) -> np.ndarray:
  """Returns a uint8 label array in {0, 1, 2}, checked against the image grid."""
  return check_labels(load(path, canonical), path, like_affine, like_shape)


def load_brain(path, like_affine: np.ndarray | None = None,
               like_shape: tuple[int, ...] | None = None,
               canonical: bool = True) -> np.ndarray:
  """Returns a uint8 brain mask in {0, 1}, checked against the image grid."""
  return check_labels(load(path, canonical), path, like_affine, like_shape,
                      values=(0, 1), what='brain mask')


def check_labels(img: nib.Nifti1Image, path, like_affine: np.ndarray | None = None,
                 like_shape: tuple[int, ...] | None = None, values=(0, 1, 2),
                 what: str = 'labels') -> np.ndarray:
  """The labels of an image already :func:`load`-ed from ``path``, checked:
  the image's grid, integers in ``values`` (``what`` names them in errors)."""
  data = np.asarray(img.dataobj)
  mask = 'mask' if what == 'labels' else what
  if like_shape is not None and tuple(data.shape) != tuple(like_shape):
    raise NiftiError(f'{path}: {mask} shape {data.shape} differs from the image '
                     f'shape {tuple(like_shape)}')
  if like_affine is not None and not np.allclose(img.affine, like_affine,
                                                 atol=1e-3):
    raise NiftiError(f'{path}: {mask} affine differs from the image affine')
  allowed = '{' + ', '.join(map(str, values)) + '}'
  if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
    raise NiftiError(f'{path}: {what} must be integers in {allowed}')
  found = np.unique(data)
  bad = found[~np.isin(found, values)]
  if bad.size:
    raise NiftiError(f'{path}: {what} must be in {allowed}, found '
                     f'{bad[:5].tolist()}')
  return data.astype(np.uint8)


# The start of the header description of every file predict writes: how a rerun
# into the input folder tells its own earlier outputs from scans.
PREDICT_MARK = 'wmh_jax predict'


def written_by_predict(path) -> bool:
  """Whether ``path``'s header description starts with :data:`PREDICT_MARK`
  (only the header is read; False for anything unreadable)."""
  try:
    descrip = nib.load(str(path)).header['descrip']
    return bytes(np.asarray(descrip).item()).startswith(PREDICT_MARK.encode())
  except (OSError, ValueError, KeyError, EOFError,
          nib.filebasedimages.ImageFileError):  # refused when read as a scan
    return False


def save(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
         header=None, dtype=None, overwrite: bool = True) -> Path:
  """Writes a NIfTI (gzipped for ``.gz``) atomically (``atomic_write``: a unique
  temporary file renamed into place, mode 0644 less the umask).

  Without ``header``, ``affine`` is both transforms (qform and sform, code 1:
  scanner). With one (``save_like``: the input's own), its qform and sform are
  written as they are, codes, quaternion and pixdim included, so a reader that
  takes either places the output where it places the input; ``affine`` must be
  the one they give.
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace)')
  if header is not None and not np.allclose(header.get_best_affine(), affine,
                                            atol=1e-6):
    raise ValueError(f'{path}: the affine given is not the header\'s own')
  img = nib.Nifti1Image(data, affine, header)
  if dtype is not None:
    img.set_data_dtype(dtype)
  if header is None:
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)

  def write_to(f):
    if path.name.endswith('.gz'):  # nibabel's own level for .nii.gz
      with gzip.GzipFile(fileobj=f, mode='wb', compresslevel=1) as gz:
        img.to_stream(gz)
    else:
      img.to_stream(f)

  return atomic_write.write(path, write_to, overwrite=overwrite)


def from_canonical(canonical_data: np.ndarray, file_affine: np.ndarray) -> np.ndarray:
  """An array in canonical RAS orientation (as from :func:`load`) on the axes of
  the file whose own affine is ``file_affine``: :func:`load`'s reorientation undone."""
  back = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt('RAS'), nib.io_orientation(file_affine))
  return nib.orientations.apply_orientation(canonical_data, back)


def file_affine(path) -> np.ndarray:
  """The voxel-to-world affine of ``path`` as stored (header only, no data read)."""
  try:
    return np.asarray(nib.load(str(path)).affine, np.float64)
  except Exception as e:  # nibabel raises many types for broken files.
    raise NiftiError(f'{path}: cannot read NIfTI header ({type(e).__name__}: {e})') from e


def on_file_axes(path, *canonical: np.ndarray) -> tuple:
  """``(*arrays, affine)``: ``canonical`` (RAS) arrays put back on the axes of the
  file ``path``, and that file's own affine (header only)."""
  affine = file_affine(path)
  return (*(from_canonical(a, affine) for a in canonical), affine)


def save_like(path, canonical_data: np.ndarray, reference, dtype=np.uint8,
              overwrite: bool = True, descrip: str | None = None) -> Path:
  """Writes ``canonical_data`` (RAS, as from :func:`load`) on ``reference``'s grid.

  The array is reoriented back to the reference file's own axis order, and the
  reference affine and header are kept, so the output overlays the input voxel
  for voxel in any viewer. ``descrip`` replaces the header's description (at
  most 80 characters; predict marks its outputs with :data:`PREDICT_MARK`).
  """
  ref = nib.load(str(reference))
  shape = ref.shape[:3]
  data = from_canonical(canonical_data, ref.affine)
  if tuple(data.shape) != tuple(shape):
    raise ValueError(f'{reference}: output shape {data.shape} does not match '
                     f'the reference shape {shape}')
  if len(ref.shape) == 4:  # a one-volume 4-D input gets a one-volume 4-D output
    data = data[..., None]
  header = ref.header.copy()
  header.set_data_shape(data.shape)
  header.set_data_dtype(dtype)
  header.set_slope_inter(1.0, 0.0)
  if descrip is not None:
    header['descrip'] = descrip.encode()[:80]
  return save(path, np.asarray(data).astype(dtype), ref.affine, header,
              dtype=dtype, overwrite=overwrite)
