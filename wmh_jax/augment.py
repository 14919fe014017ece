"""Small pure TensorFlow augmentation ops for tf.data, each seeded statelessly.

Volumes are ``(X, Y, Z)``; every random op takes a ``seed`` of shape [2] (int) and
gives the same output for the same seed, eagerly or inside ``tf.data``.
"""

import math

import tensorflow as tf


def _uniform(seed, shape, lo, hi):
  return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


def _rotation(angles):
  """Rotation matrix from angles (radians) about X, Y and Z: Rz @ Ry @ Rx."""
  ax, ay, az = angles[0], angles[1], angles[2]
  one, zero = tf.ones([]), tf.zeros([])
  c, s = tf.cos, tf.sin
  rx = tf.stack([[one, zero, zero], [zero, c(ax), -s(ax)], [zero, s(ax), c(ax)]])
  ry = tf.stack([[c(ay), zero, s(ay)], [zero, one, zero], [-s(ay), zero, c(ay)]])
  rz = tf.stack([[c(az), -s(az), zero], [s(az), c(az), zero], [zero, zero, one]])
  return rz @ ry @ rx


def random_affine(seed, shape, spacing, rotate_deg=(5., 5., 15.), scale=0.1,
                  shear=0.05, translate_vox=(8., 8., 1.), flip_lr=True):
  """A random output-index -> input-index affine ``(matrix 3x3, offset 3)``.

  Rotation, scale and shear act in physical space (``spacing`` in mm per voxel,
  so an in-plane rotation of an anisotropic grid stays a rotation), about the
  volume centre; the left-right flip mirrors the X axis.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  rot = tf.constant(rotate_deg, tf.float32) * (math.pi / 180)
  angles = _uniform(seeds[0], [3], -1.0, 1.0) * rot
  s = 1.0 + _uniform(seeds[1], [], -scale, scale)
  sh = _uniform(seeds[2], [3], -shear, shear)
  shear_m = tf.stack([[1.0, sh[0], sh[1]], [0.0, 1.0, sh[2]], [0.0, 0.0, 1.0]])
  lin = _rotation(angles) @ shear_m * s
  if flip_lr:
    sign = tf.where(_uniform(seeds[3], [], 0.0, 1.0) < 0.5, -1.0, 1.0)
    lin = lin @ tf.linalg.diag(tf.stack([sign, 1.0, 1.0]))
  spacing = tf.cast(spacing, tf.float32)
  matrix = (lin / spacing[:, None]) * spacing[None, :]  # diag(1/vs) L diag(vs)
  centre = (tf.cast(shape, tf.float32) - 1.0) / 2.0
  shift = _uniform(seeds[4], [3], -1.0, 1.0) * tf.constant(translate_vox)
  offset = centre - tf.linalg.matvec(matrix, centre) + shift
  return matrix, offset


def sample_linear(volume, matrix, offset, out_shape=None):
  """Trilinear ``volume[matrix @ i + offset]`` over output indices ``i``.

  Out-of-range positions take the nearest edge value.
  """
  shape = tf.shape(volume)
  out_shape = shape if out_shape is None else out_shape
  grid = tf.meshgrid(*[tf.range(out_shape[a], dtype=tf.float32) for a in range(3)],
                     indexing='ij')
  idx = tf.reshape(tf.stack(grid, 0), [3, -1])
  src = matrix @ idx + offset[:, None]
  hi = tf.cast(shape, tf.float32)[:, None] - 1.0
  src = tf.clip_by_value(src, 0.0, hi)
  lo = tf.minimum(tf.floor(src), tf.maximum(hi - 1.0, 0.0))
  frac = src - lo
  lo = tf.cast(lo, tf.int32)
  flat = tf.reshape(volume, [-1])
  strides = tf.stack([shape[1] * shape[2], shape[2], 1])[:, None]
  out = 0.0
  for corner in range(8):
    bits = tf.constant([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])[:, None]
    pos = tf.minimum(lo + bits, tf.cast(hi, tf.int32))
    w = tf.reduce_prod(tf.where(bits == 1, frac, 1.0 - frac), axis=0)
    out += w * tf.gather(flat, tf.reduce_sum(pos * strides, axis=0))
  return tf.reshape(out, out_shape)


def affine_pair(image, labels, matrix, offset, *soft, out_shape=None):
  """Applies one affine to an image (linear) and its {0,1,2} labels.

  Labels are resampled through their lesion and other-pathology indicators
  (threshold 0.5; lesion wins), so a lesion never becomes label 2. Soft volumes
  in [0, 1] (the lesion fraction, the brain fraction) are resampled linearly and
  returned after them: ``(image, labels, *soft)``, each of ``out_shape`` (the
  input's shape when None; a crop of the warped volume: :func:`crop_affine`).
  """
  warp = lambda v: sample_linear(v, matrix, offset, out_shape)
  lesion = warp(tf.cast(labels == 1, tf.float32)) >= 0.5
  other = warp(tf.cast(labels == 2, tf.float32)) >= 0.5
  labels = tf.cast(tf.where(lesion, 1, tf.where(other, 2, 0)), tf.uint8)
  return (warp(image), labels,
          *(tf.clip_by_value(warp(v), 0., 1.) for v in soft))


def random_intensity(image, seed, amount=0.1):
  """``image * U(1-a, 1+a) + U(-a, a)`` (image is z-scored)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  gain = _uniform(seeds[0], [], 1.0 - amount, 1.0 + amount)
  bias = _uniform(seeds[1], [], -amount, amount)
  return image * gain + bias


def random_gamma(image, seed, log_sd=0.25):
  """Contrast: the volume's range mapped to [0, 1], raised to ``exp(N(0, log_sd))``
  and mapped back (gamma < 1 brightens the mid-tones, > 1 darkens them)."""
  lo = tf.reduce_min(image)
  span = tf.maximum(tf.reduce_max(image) - lo, 1e-6)
  gamma = tf.exp(tf.random.stateless_normal([], seed) * log_sd)
  return lo + span * tf.pow(tf.clip_by_value((image - lo) / span, 0.0, 1.0), gamma)


def random_bias_field(image, seed, amount=0.3, full_shape=None, start=None, lo=None):
  """A smooth multiplicative field on ``image - lo`` (``lo``: the image's minimum
  unless given, so the background stays dark): ``exp`` of a degree-2
  polynomial of the coordinates (each axis on [-1, 1]) with coefficients
  ``U(-a, a)``, as scanners' coil sensitivity.

  When ``image`` is a crop starting at ``start`` of a volume of ``full_shape``
  whose minimum is ``lo``, the crop gets exactly its part of that volume's field.
  """
  shape = tf.shape(image)
  full_shape = shape if full_shape is None else tf.cast(full_shape, tf.int32)
  start = tf.zeros([3], tf.int32) if start is None else tf.cast(start, tf.int32)
  axes = [tf.linspace(-1.0, 1.0, full_shape[a])[start[a]:start[a] + shape[a]]
          for a in range(3)]
  x, y, z = tf.meshgrid(*axes, indexing='ij')
  terms = tf.stack([x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3,
                    z * z - 1 / 3])
  coef = _uniform(seed, [9], -amount, amount)
  field = tf.exp(tf.tensordot(coef, terms, axes=1))
  lo = tf.reduce_min(image) if lo is None else lo
  return lo + (image - lo) * field


def random_noise(image, seed, max_sd=0.1):
  """Gaussian noise of a standard deviation ``U(0, max_sd)`` (z-score units)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  sd = _uniform(seeds[0], [], 0.0, max_sd)
  return image + sd * tf.random.stateless_normal(tf.shape(image), seeds[1])


def crop_start(labels, matrix, offset, size, seed, lesion_fraction=0.5):
  """Where a ``size`` crop of ``labels`` warped by the affine starts, chosen
  before warping (so that only the crop need be resampled: :func:`crop_affine`).

  With probability ``lesion_fraction``, when ``labels`` holds a lesion, the crop
  is centred where the affine takes one of its lesion voxels, drawn uniformly
  (output index ``i`` reads input index ``matrix @ i + offset``, so input voxel
  ``v`` lands at ``inv(matrix) @ (v - offset)``); otherwise it starts uniformly.
  Both are clipped to the volume. With the identity affine this is the crop of
  the labels themselves.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  shape = tf.shape(labels)
  size = tf.cast(size, tf.int32)   # a tuple, or a tensor (a whole axis: crop_size)
  room = shape - size
  uniform_start = tf.cast(
      tf.floor(_uniform(seeds[0], [3], 0.0, 1.0) * tf.cast(room + 1, tf.float32)),
      tf.int32)
  lesions = tf.cast(tf.where(labels == 1), tf.float32)
  n = tf.shape(lesions)[0]
  pick = tf.random.stateless_uniform([], seeds[1], 0, tf.maximum(n, 1), tf.int32)
  # A dummy row keeps the gather valid when there is no lesion (then unused).
  voxel = tf.gather(tf.concat([lesions, tf.zeros([1, 3])], 0), pick)
  centre = tf.linalg.matvec(tf.linalg.inv(tf.cast(matrix, tf.float32)),
                            voxel - tf.cast(offset, tf.float32))
  lesion_start = tf.clip_by_value(tf.cast(tf.round(centre), tf.int32) - size // 2,
                                  0, room)
  use_lesion = (n > 0) & (_uniform(seeds[2], [], 0.0, 1.0) < lesion_fraction)
  return tf.where(use_lesion, lesion_start, uniform_start)


def crop_size(patch_size, shape):
  """``patch_size`` for a volume of ``shape``: a tuple, or with a None size (that
  whole axis: a subject's own depth) a tensor."""
  if all(p is not None for p in patch_size):
    return tuple(patch_size)
  return tf.stack([shape[a] if p is None else tf.constant(p)
                   for a, p in enumerate(patch_size)])


def crop_affine(matrix, offset, start):
  """The affine of the crop at ``start`` of the warped volume: its index ``j``
  is the warped volume's ``start + j``, read at ``matrix @ (start + j) + offset``."""
  return matrix, offset + tf.linalg.matvec(matrix, tf.cast(start, tf.float32))
