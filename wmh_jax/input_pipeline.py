"""tf.data input pipeline over prepared (decoded, z-scored, resized) subjects.

shuffle(seed) -> repeat -> enumerate -> skip(resume) -> map(augment, seeded by the
element's position) -> batch(drop_remainder) -> prefetch. The same seed gives the
same batches, and a resumed run continues with the batches it would have seen.
"""

import numpy as np
import tensorflow as tf

from wmh_jax import augment
from wmh_jax import subjects


SOFT_KEYS = ('target', 'brain')  # soft volumes that follow the labels' geometry


def _stack(volumes, depth: int, dtype) -> np.ndarray:
  """``volumes`` stacked, each padded along Z to ``depth`` with zeros (never
  seen: :func:`own_depth` cuts a subject back before it is used)."""
  return np.stack([np.pad(v, ((0, 0), (0, 0), (0, depth - v.shape[2])))
                   for v in volumes]).astype(dtype)


def stack_prepared(prepared: list[dict], *, soft_targets: bool = False,
                   brain: bool = False, brain_norm: bool = False
                   ) -> dict[str, np.ndarray]:
  """Stacks prepared subjects.

  Subjects of different depths (``data.grid_max_depth``) are padded along Z to
  the deepest, and ``depth`` gives each one's own.

  With ``soft_targets`` adds their lesion fraction on the grid as ``target``.
  With ``brain``, when any subject has a brain mask, adds the brain fraction as
  ``brain`` (zeros for subjects without one) and ``has_brain`` (1 or 0 per
  subject: the loss's weight for the brain channel). With ``brain_norm``, when
  any subject has a brain mask, adds its image z-scored in the brain as
  ``image_brain`` (the head-z-scored ``image`` for subjects without one).
  """
  depths = [p['image'].shape[2] for p in prepared]
  z = max(depths)
  arrays = {
      'image': _stack([p['image'] for p in prepared], z, np.float32),
      'labels': _stack([p['labels'] for p in prepared], z, np.uint8),
      'spacing': np.stack([subjects.grid_spacing(p) for p in prepared]
                          ).astype(np.float32),
  }
  if len(set(depths)) > 1:
    arrays['depth'] = np.array(depths, np.int32)
  if soft_targets:
    arrays['target'] = _stack([p['lesion_fraction'] for p in prepared], z, np.float32)
  if brain and any('brain_fraction' in p for p in prepared):
    arrays['brain'] = _stack([p.get('brain_fraction', np.zeros_like(p['image']))
                              for p in prepared], z, np.float32)
    arrays['has_brain'] = np.array(['brain_fraction' in p for p in prepared],
                                   np.float32)
  if brain_norm and any('image_brain' in p for p in prepared):
    arrays['image_brain'] = _stack([p.get('image_brain', p['image'])
                                    for p in prepared], z, np.float32)
  return arrays


def own_depth(example: dict) -> dict:
  """One subject's entries of :func:`stack_prepared`'s arrays (numpy, or tensors
  in tf.data), its volumes cut back to its ``depth`` when it has one."""
  if 'depth' not in example:
    return example
  depth = example['depth']
  return {k: v[..., :depth] if len(v.shape) == 3 else v
          for k, v in example.items() if k != 'depth'}


def subject_arrays(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
  """Subject ``i``'s entries of :func:`stack_prepared`'s ``arrays``, cut back
  to its own depth."""
  return own_depth({k: v[i] for k, v in arrays.items()})


def _scanner_look(image, seed, aug_config, full_shape, start, lo):
  """The bias field, contrast and noise of ``aug_config`` (each left out at 0,
  so configs without them give the batches of configs without these keys).
  ``image`` is the crop at ``start`` of a warped volume of ``full_shape`` and
  minimum ``lo``: the bias field is the crop of that volume's; the contrast
  maps the crop's own range (before stop 30, the whole volume's)."""
  ops = ((lambda x, s, a: augment.random_bias_field(x, s, a, full_shape, start, lo),
          aug_config.get('bias_field', 0.0)),
         (augment.random_gamma, aug_config.get('gamma', 0.0)),
         (augment.random_noise, aug_config.get('noise', 0.0)))
  for k, (op, amount) in enumerate(ops):
    if amount:
      image = op(image, tf.random.experimental.stateless_fold_in(seed, k + 1), amount)
  return image


def augment_example(example, seed, aug_config, patch_size=None,
                    lesion_patch_fraction=0.5, brain_norm_fraction=0.5):
  """Augments one ``{'image', 'labels', 'spacing'[, 'target', 'brain',
  'has_brain', 'image_brain']}`` example; adds a channel axis to the image. The
  soft volumes (``SOFT_KEYS``) follow the labels' geometry; ``has_brain`` passes
  through. With ``image_brain`` (data.input_norm='brain'), the image is that
  one (z-scored in the brain) with probability ``brain_norm_fraction``.

  With ``patch_size`` the crop's place is chosen before warping
  (``augment.crop_start``) and only the crop is resampled: the voxels of the
  warped volume's crop there, for a crop's work instead of the volume's. A None
  size takes that whole axis (``(64, 64, None)``: every slice of the subject).
  """
  example = own_depth(example)  # subjects of several depths: this one's own
  image, labels = example['image'], example['labels']
  if 'image_brain' in example:  # its own stream: the other draws stay as they were
    pick = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(seed, 7))
    image = tf.where(pick < brain_norm_fraction, example['image_brain'], image)
  keys = [k for k in SOFT_KEYS if k in example]
  soft = [example[k] for k in keys]
  seeds = tf.random.experimental.stateless_split(seed, 3)
  shape = tf.shape(image)
  matrix, offset = tf.eye(3), tf.zeros([3])
  if aug_config.enabled:
    matrix, offset = augment.random_affine(
        seeds[0], shape, example['spacing'],
        rotate_deg=tuple(aug_config.rotate_deg), scale=aug_config.scale,
        shear=aug_config.shear, translate_vox=tuple(aug_config.translate_vox),
        flip_lr=aug_config.flip_lr)
  start, out_shape = tf.zeros([3], tf.int32), None
  if patch_size is not None:
    out_shape = augment.crop_size(patch_size, shape)
    start = augment.crop_start(labels, matrix, offset, out_shape, seeds[2],
                               lesion_patch_fraction)
  if aug_config.enabled:
    matrix, offset = augment.crop_affine(matrix, offset, start)
    lo = None  # the warped volume's minimum, which the bias field needs for a crop:
    if aug_config.get('bias_field', 0.0):  # the input's (convex trilinear weights,
      lo = augment.random_intensity(       # and the background is sampled)
          tf.reduce_min(image), seeds[1], aug_config.intensity)
    image, labels, *soft = augment.affine_pair(image, labels, matrix, offset, *soft,
                                               out_shape=out_shape)
    image = augment.random_intensity(image, seeds[1], aug_config.intensity)
    image = _scanner_look(image, seeds[1], aug_config, shape, start, lo)
  elif out_shape is not None:
    image, labels, *soft = (tf.slice(v, start, out_shape)
                            for v in (image, labels, *soft))
  out = {'image': image[..., None], 'labels': labels, **dict(zip(keys, soft))}
  if 'has_brain' in example:
    out['has_brain'] = example['has_brain']
  return out


def train_dataset(arrays: dict[str, np.ndarray], config, start_step: int = 0):
  """Infinite, augmented, batched training batches as a ``tf.data.Dataset``.

  ``data.pipeline_threads`` (0: TF's default) bounds tf.data's own thread pool,
  each op on one thread; the batches are the same (a deterministic map)."""
  n = arrays['image'].shape[0]
  seed = config.seed
  ds = tf.data.Dataset.from_tensor_slices(arrays)
  ds = ds.shuffle(max(n, min(config.data.shuffle_buffer, n)), seed=seed,
                  reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_step * config.train.batch_size)
  patch = config.train.patch_size
  smallest = (*arrays['image'].shape[1:3], int(np.min(arrays.get(
      'depth', arrays['image'].shape[3]))))
  if patch is not None and any(p is not None and p > g for p, g in zip(patch, smallest)):
    raise ValueError(f'train.patch_size {tuple(patch)} is larger than the grid '
                     f'{smallest} (data.grid; along Z the shallowest subject\'s, '
                     'with data.grid_max_depth)')
  whole_depth = patch is None or patch[2] is None
  if whole_depth and 'depth' in arrays and config.train.batch_size > 1:
    raise ValueError(f'train.patch_size={None if patch is None else tuple(patch)} '
                     'takes each subject\'s whole depth, and with data.grid_max_depth '
                     f'the depths differ: train.batch_size={config.train.batch_size} '
                     'cannot stack them; give a depth or batch_size 1')
  fn = lambda i, ex: augment_example(
      ex, tf.stack([tf.constant(seed, tf.int64), i]), config.augment,
      None if patch is None else tuple(patch),
      config.train.lesion_patch_fraction,
      subjects.brain_norm_fraction(config.data))
  threads = config.data.get('pipeline_threads', 0)
  if threads:  # beside XLA on a few cores: fewer threads contend with its step
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(config.train.batch_size, drop_remainder=True)
  return ds.prefetch(2)
