import numpy as np
import pytest
import tensorflow as tf

from configs import test as test_config
from wmh_jax import augment
from wmh_jax import input_pipeline


def _volume():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(16, 12, 6)).astype(np.float32)
  labels = np.zeros((16, 12, 6), np.uint8)
  labels[4:9, 3:8, 2:4] = 1
  labels[10:13, 3:6, 1:3] = 2
  return image, labels


def test_identity_affine_is_identity():
  image, labels = _volume()
  eye, zero = tf.eye(3), tf.zeros(3)
  out_i, out_l = augment.affine_pair(image, labels, eye, zero)
  np.testing.assert_allclose(out_i.numpy(), image, atol=1e-6)
  np.testing.assert_array_equal(out_l.numpy(), labels)


def test_flip_only_affine_mirrors_x():
  image, labels = _volume()
  m = tf.linalg.diag(tf.constant([-1.0, 1.0, 1.0]))
  off = tf.constant([15.0, 0.0, 0.0])
  out_i, out_l = augment.affine_pair(image, labels, m, off)
  np.testing.assert_allclose(out_i.numpy(), image[::-1], atol=1e-6)
  np.testing.assert_array_equal(out_l.numpy(), labels[::-1])


def test_same_seed_same_output_eager_and_in_tf_data():
  image, labels = _volume()
  cfg = test_config.get_config()
  ex = {'image': image, 'labels': labels,
        'spacing': np.array([1.0, 1.0, 3.0], np.float32)}
  seed = tf.constant([3, 7], tf.int64)
  eager = input_pipeline.augment_example(ex, seed, cfg.augment, (8, 8, 4))
  ds = tf.data.Dataset.from_tensors(ex).map(
      lambda e: input_pipeline.augment_example(e, seed, cfg.augment, (8, 8, 4)))
  graph = next(iter(ds))
  np.testing.assert_allclose(eager['image'].numpy(), graph['image'].numpy(),
                             atol=1e-5)
  np.testing.assert_array_equal(eager['labels'].numpy(), graph['labels'].numpy())
  assert eager['image'].shape == (8, 8, 4, 1)
  other = input_pipeline.augment_example(ex, tf.constant([3, 8], tf.int64),
                                         cfg.augment, (8, 8, 4))
  assert not np.allclose(other['image'].numpy(), eager['image'].numpy())


def test_random_affine_keeps_label_set_and_lesion():
  image = np.random.default_rng(0).normal(size=(32, 32, 8)).astype(np.float32)
  labels = np.zeros((32, 32, 8), np.uint8)
  labels[12:20, 12:20, 2:6] = 1     # a central lesion: stays inside the volume
  labels[4:8, 4:8, 3:5] = 2
  for s in range(5):
    m, off = augment.random_affine(tf.constant([s, 0]), tf.shape(image),
                                   tf.constant([1.0, 1.0, 3.0]),
                                   translate_vox=(0.0, 0.0, 0.0))
    _, out = augment.affine_pair(image, labels, m, off)
    out = out.numpy()
    assert set(np.unique(out)) <= {0, 1, 2}
    assert 0.6 < (out == 1).sum() / (labels == 1).sum() < 1.6


def _crop(volumes, labels, size, seed, fraction, matrix=None, offset=None):
  """``volumes`` cut at :func:`augment.crop_start`'s start (identity affine
  unless given)."""
  matrix = tf.eye(3) if matrix is None else matrix
  offset = tf.zeros(3) if offset is None else offset
  start = augment.crop_start(labels, matrix, offset, size, seed, fraction)
  return [tf.slice(v, start, size).numpy() for v in volumes]


def test_lesion_centred_crop_contains_lesion():
  image, labels = _volume()
  for s in range(5):
    _, crop = _crop([image, labels], labels, (6, 6, 2), tf.constant([s, 1], tf.int64), 1.0)
    assert (crop == 1).any()


def test_crop_of_lesion_free_volume():
  image, labels = _volume()
  labels[labels == 1] = 0
  for s in range(3):
    img, crop = _crop([image, labels], labels, (6, 6, 2), tf.constant([s, 1], tf.int64),
                      1.0)
    assert img.shape == (6, 6, 2) and not (crop == 1).any()


def test_the_warped_crop_is_the_crop_of_the_warped_volume():
  image, labels = _volume()
  target = (labels == 1).astype(np.float32) * 0.8
  size = (6, 6, 2)
  for s in range(6):
    m, off = augment.random_affine(tf.constant([s, 0]), tf.shape(image),
                                   tf.constant([1.0, 1.0, 3.0]))
    start = augment.crop_start(labels, m, off, size, tf.constant([s, 1], tf.int64), 0.8)
    whole = augment.affine_pair(image, labels, m, off, target)
    cm, coff = augment.crop_affine(m, off, start)
    crop = augment.affine_pair(image, labels, cm, coff, target, out_shape=size)
    for w, c in zip(whole, crop):
      assert c.shape == size
      np.testing.assert_allclose(c.numpy(), tf.slice(w, start, size).numpy(),
                                 atol=1e-4, err_msg=f'seed {s}')


def test_lesion_centred_crop_of_a_warped_volume_holds_the_lesion():
  image = np.random.default_rng(1).normal(size=(40, 36, 10)).astype(np.float32)
  labels = np.zeros(image.shape, np.uint8)
  labels[6:10, 26:30, 2:5] = 1          # off-centre lesions, so shifts and flips show
  labels[30:33, 5:8, 6:8] = 1
  size = (8, 8, 4)
  for s in range(10):
    m, off = augment.random_affine(tf.constant([s, 3]), tf.shape(image),
                                   tf.constant([1.0, 1.0, 3.0]), rotate_deg=(5., 5., 30.),
                                   translate_vox=(6.0, 6.0, 1.0))
    start = augment.crop_start(labels, m, off, size, tf.constant([s, 4], tf.int64), 1.0)
    _, warped = augment.affine_pair(image, labels, m, off)
    assert (tf.slice(warped, start, size).numpy() == 1).any(), s


def test_pipeline_is_deterministic_and_resumable():
  image, labels = _volume()
  cfg = test_config.get_config()
  arrays = {'image': np.stack([image, image * 2, -image]),
            'labels': np.stack([labels] * 3),
            'spacing': np.ones((3, 3), np.float32)}
  a = list(input_pipeline.train_dataset(arrays, cfg).take(5).as_numpy_iterator())
  b = list(input_pipeline.train_dataset(arrays, cfg).take(5).as_numpy_iterator())
  c = list(input_pipeline.train_dataset(arrays, cfg, start_step=3).take(2)
           .as_numpy_iterator())
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  for x, y in zip(a[3:], c):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_pipeline_threads_change_no_batch():
  # data.pipeline_threads bounds tf.data's threads; the batches stay the same.
  image, labels = _volume()
  arrays = {'image': np.stack([image, image * 2, -image]),
            'labels': np.stack([labels] * 3),
            'spacing': np.ones((3, 3), np.float32)}
  batches = {}
  for threads in (0, 1, 2):
    cfg = test_config.get_config()
    cfg.data.pipeline_threads = threads
    ds = input_pipeline.train_dataset(arrays, cfg)
    assert ds.options().threading.private_threadpool_size == (threads or None)
    batches[threads] = list(ds.take(6).as_numpy_iterator())
  for threads in (1, 2):
    for x, y in zip(batches[0], batches[threads]):
      np.testing.assert_array_equal(x['image'], y['image'])
      np.testing.assert_array_equal(x['labels'], y['labels'])


def test_soft_target_follows_the_labels_through_affine_and_crop():
  image, labels = _volume()
  target = (labels == 1).astype(np.float32) * 0.8   # a soft lesion fraction
  m, off = augment.random_affine(tf.constant([3, 0]), tf.shape(image),
                                 tf.constant([1.0, 1.0, 3.0]))
  _, warped_labels, warped_target = augment.affine_pair(image, labels, m, off, target)
  warped_target = warped_target.numpy()
  assert 0.0 <= warped_target.min() and warped_target.max() <= 0.8 + 1e-6
  # Same geometry: where the warped fraction is high the warped label is lesion.
  assert (warped_labels.numpy()[warped_target > 0.6] == 1).all()
  crop_labels, crop_target = _crop([labels, target], labels, (6, 6, 2),
                                   tf.constant([1, 1], tf.int64), 1.0)
  assert (crop_labels == 1).any()
  np.testing.assert_allclose(crop_target, (crop_labels == 1) * 0.8)


def test_pipeline_carries_the_soft_target_when_asked():
  image, labels = _volume()
  prepared = [{'image': image, 'labels': labels, 'native_shape': np.array(image.shape),
               'spacing': np.ones(3), 'lesion_fraction': (labels == 1) * 0.5}] * 2
  cfg = test_config.get_config()
  hard = input_pipeline.stack_prepared(prepared)
  soft = input_pipeline.stack_prepared(prepared, soft_targets=True)
  assert 'target' not in hard and soft['target'].shape == (2, *image.shape)
  batch = next(input_pipeline.train_dataset(soft, cfg).as_numpy_iterator())
  assert batch['target'].shape == batch['labels'].shape
  assert 'target' not in next(input_pipeline.train_dataset(hard, cfg).as_numpy_iterator())


def test_brain_and_target_follow_the_labels_together():
  image, labels = _volume()
  target = (labels == 1).astype(np.float32) * 0.8
  brain = np.zeros(labels.shape, np.float32)
  brain[2:14, 1:10, :] = 1.0                        # holds the lesion and label 2
  m, off = augment.random_affine(tf.constant([5, 0]), tf.shape(image),
                                 tf.constant([1.0, 1.0, 3.0]))
  _, l1, t1 = augment.affine_pair(image, labels, m, off, target)
  i2, l2, t2, b2 = augment.affine_pair(image, labels, m, off, target, brain)
  np.testing.assert_array_equal(l1.numpy(), l2.numpy())
  np.testing.assert_array_equal(t1.numpy(), t2.numpy())
  # The brain went through the same (linear) resampling as the image would.
  np.testing.assert_allclose(b2.numpy(), augment.sample_linear(brain, m, off).numpy(),
                             atol=1e-6)
  assert (b2.numpy()[l2.numpy() > 0] > 0.4).all()  # lesions stay inside the brain
  crop_labels, crop_target, crop_brain = _crop(
      [labels, target, brain], labels, (6, 6, 2), tf.constant([2, 1], tf.int64), 1.0)
  np.testing.assert_allclose(crop_target, (crop_labels == 1) * 0.8)
  # The lesion voxels of the crop are brain voxels of the same crop.
  assert (crop_brain[crop_labels == 1] == 1.0).all()


def test_pipeline_carries_brain_and_has_brain():
  image, labels = _volume()
  brain = np.zeros(labels.shape, np.float32)
  brain[2:14, 1:10, :] = 1.0
  base = {'image': image, 'labels': labels, 'native_shape': np.array(image.shape),
          'spacing': np.ones(3), 'lesion_fraction': (labels == 1) * 0.5}
  prepared = [{**base, 'brain_fraction': brain}, base]   # the second has no mask
  arrays = input_pipeline.stack_prepared(prepared, soft_targets=True, brain=True)
  np.testing.assert_array_equal(arrays['has_brain'], [1.0, 0.0])
  np.testing.assert_array_equal(arrays['brain'][1], 0.0)
  assert 'brain' not in input_pipeline.stack_prepared(prepared)
  assert 'brain' not in input_pipeline.stack_prepared([base], brain=True)
  cfg = test_config.get_config()
  cfg.train.batch_size = 2
  cfg.train.patch_size = (8, 8, 4)
  batch = next(input_pipeline.train_dataset(arrays, cfg).as_numpy_iterator())
  assert batch['brain'].shape == batch['labels'].shape == (2, 8, 8, 4)
  assert sorted(batch['has_brain']) == [0.0, 1.0]   # one of each in the batch
  for k in range(2):   # each example: its own mask, or zeros without one
    if batch['has_brain'][k]:
      assert (batch['brain'][k][batch['labels'][k] == 1] > 0.4).all()
    else:
      assert not batch['brain'][k].any()


def _image_of_labels(labels):
  """An image that is a known function of the labels: +10 on label 1, -10 on
  label 2, plus a smooth gradient in [0, 1] (so that a wrong transform is not
  hidden by a constant background)."""
  g = np.meshgrid(*[np.linspace(0, 1, s) for s in labels.shape], indexing='ij')
  return (10.0 * (labels == 1) - 10.0 * (labels == 2) + (g[0] + g[1] + g[2]) / 3
          ).astype(np.float32)


def _uniform_neighbourhood(labels):
  """Voxels whose 3x3x3 neighbourhood holds one label (away from the edges the
  interpolation blurs)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  lo = ndimage.minimum_filter(labels, size=3, mode='nearest')
  hi = ndimage.maximum_filter(labels, size=3, mode='nearest')
  return lo == hi


def test_image_and_mask_stay_aligned_under_strong_random_affines():
  labels = np.zeros((40, 36, 12), np.uint8)
  labels[8:20, 6:18, 3:9] = 1          # off-centre, so flips and shifts show
  labels[22:36, 18:32, 3:9] = 2
  labels[26:30, 8:12, 2:10] = 1
  image = _image_of_labels(labels)
  cfg = test_config.get_config().augment
  cfg.enabled = True
  cfg.rotate_deg, cfg.scale, cfg.shear = (15.0, 15.0, 30.0), 0.25, 0.15
  cfg.translate_vox, cfg.flip_lr = (6.0, 6.0, 2.0), True
  cfg.intensity = 0.25   # gain in [0.75, 1.25], bias in +-0.25: thresholds hold
  ex = {'image': image, 'labels': labels,
        'spacing': np.array([1.0, 1.2, 3.0], np.float32)}
  moved = 0
  for s in range(8):
    # Whole volumes, and crops resampled alone (the default's training path).
    patch = None if s % 2 else (36, 32, 10)
    out = input_pipeline.augment_example(ex, tf.constant([s, 11], tf.int64), cfg, patch)
    warped_image, warped = out['image'].numpy()[..., 0], out['labels'].numpy()
    from_image = np.where(warped_image > 5, 1, np.where(warped_image < -5, 2, 0))
    inner = _uniform_neighbourhood(warped)
    if patch:   # a crop's edge voxels have neighbours outside it: not judged
      edge = np.ones_like(inner)
      edge[1:-1, 1:-1, 1:-1] = False
      inner &= ~edge
    for k in (0, 1, 2):   # each label has voxels to compare
      assert (inner & (warped == k)).sum() > 20, (s, k)
    np.testing.assert_array_equal(from_image[inner], warped[inner], err_msg=f'seed {s}')
    moved += warped.shape != labels.shape or not np.array_equal(warped, labels)
  assert moved == 8   # every seed moved the volume


def test_scanner_look_ops_are_seeded_smooth_and_keep_the_background_dark():
  image, _ = _volume()
  seed = tf.constant([4, 2], tf.int64)
  for op, amount in ((augment.random_bias_field, 0.2), (augment.random_gamma, 0.3),
                     (augment.random_noise, 0.2)):
    a, b = op(image, seed, amount).numpy(), op(image, seed, amount).numpy()
    np.testing.assert_array_equal(a, b)                     # same seed, same volume
    assert not np.allclose(a, op(image, tf.constant([4, 3], tf.int64), amount))
    assert not np.allclose(a, image)
  field = augment.random_bias_field(image, seed, 0.2).numpy()
  lo = image.min()
  gain = (field - lo)[image > lo + 0.5] / (image - lo)[image > lo + 0.5]
  assert gain.min() > np.exp(-0.2 * 9) and gain.max() < np.exp(0.2 * 9)
  flat = np.full((16, 12, 6), 2.0, np.float32)
  flat[0, 0, 0] = 0.0                                       # the background level
  g = augment.random_bias_field(flat, seed, 0.2).numpy()
  assert g[0, 0, 0] == 0.0                                  # background stays dark
  steps = np.abs(np.diff(g[1:-1, 1:-1, 1:-1], axis=0))
  assert steps.max() < 0.1 * g[1:-1].mean()                 # a smooth field
  gam = augment.random_gamma(image, seed, 0.3).numpy()
  np.testing.assert_allclose([gam.min(), gam.max()], [image.min(), image.max()],
                             rtol=1e-5)                     # range kept, order kept
  assert (np.argsort(gam, axis=None) == np.argsort(image, axis=None)).mean() > 0.99
  noise = augment.random_noise(image, seed, 0.2).numpy() - image
  assert 0 < noise.std() < 0.2


def test_scanner_look_off_gives_the_batches_of_before_and_on_changes_only_the_image():
  image, labels = _volume()
  ex = {'image': image, 'labels': labels,
        'spacing': np.array([1.0, 1.0, 3.0], np.float32)}
  cfg = test_config.get_config().augment
  cfg.enabled = True
  seed = tf.constant([5, 1], tf.int64)
  plain = input_pipeline.augment_example(ex, seed, cfg, (8, 8, 4))
  old = {k: v for k, v in cfg.items() if k not in ('bias_field', 'gamma', 'noise')}
  before = input_pipeline.augment_example(ex, seed, type(cfg)(old), (8, 8, 4))
  np.testing.assert_array_equal(plain['image'].numpy(), before['image'].numpy())
  cfg.bias_field, cfg.gamma, cfg.noise = 0.2, 0.3, 0.1
  looked = input_pipeline.augment_example(ex, seed, cfg, (8, 8, 4))
  np.testing.assert_array_equal(looked['labels'].numpy(), plain['labels'].numpy())
  assert not np.allclose(looked['image'].numpy(), plain['image'].numpy())


def test_brain_normalised_input_is_drawn_in_its_share_of_examples_and_nothing_else_moves():
  image, labels = _volume()
  other = (image * 0.5 + 3.0).astype(np.float32)   # the same scan, z-scored elsewhere
  base = {'image': image, 'labels': labels, 'native_shape': np.array(image.shape),
          'spacing': np.ones(3), 'lesion_fraction': (labels == 1) * 0.5,
          'brain_fraction': (labels > 0).astype(np.float32)}
  prepared = [{**base, 'image_brain': other}, base]   # the second has no brain mask
  arrays = input_pipeline.stack_prepared(prepared, soft_targets=True, brain=True,
                                        brain_norm=True)
  np.testing.assert_array_equal(arrays['image_brain'], [other, image])
  assert 'image_brain' not in input_pipeline.stack_prepared(prepared, soft_targets=True,
                                                            brain=True)
  ex = {k: arrays[k][0] for k in ('image', 'labels', 'spacing', 'image_brain')}
  cfg = test_config.get_config().augment
  cfg.enabled = True
  plain = {k: v for k, v in ex.items() if k != 'image_brain'}
  swapped = {**plain, 'image': other}
  picks = []
  for s in range(40):
    seed = tf.constant([s, 2], tf.int64)
    out = input_pipeline.augment_example(ex, seed, cfg, (8, 8, 4), 0.5, 0.5)
    head = input_pipeline.augment_example(plain, seed, cfg, (8, 8, 4), 0.5)
    brain = input_pipeline.augment_example(swapped, seed, cfg, (8, 8, 4), 0.5)
    # The same crop and labels either way; the image is one of the two inputs.
    np.testing.assert_array_equal(out['labels'].numpy(), head['labels'].numpy())
    is_head = np.array_equal(out['image'].numpy(), head['image'].numpy())
    is_brain = np.array_equal(out['image'].numpy(), brain['image'].numpy())
    assert is_head != is_brain
    picks.append(is_brain)
    for fraction, want in ((0.0, head), (1.0, brain)):
      np.testing.assert_array_equal(input_pipeline.augment_example(
          ex, seed, cfg, (8, 8, 4), 0.5, fraction)['image'].numpy(),
                                    want['image'].numpy())
  assert 10 <= sum(picks) <= 30


def test_crop_without_augmentation_cuts_every_volume_at_one_place():
  shape = (16, 12, 6)
  idx = np.indices(shape).astype(np.float32)
  code = idx[0] * 10000 + idx[1] * 100 + idx[2]        # each voxel names its place
  _, labels = _volume()
  ex = {'image': code, 'labels': labels, 'spacing': np.ones(3, np.float32),
        'target': code + 0.5, 'brain': code + 0.25}
  cfg = test_config.get_config().augment
  cfg.enabled = False
  for s in range(6):
    out = input_pipeline.augment_example(ex, tf.constant([s, 5], tf.int64), cfg, (8, 6, 4),
                                         0.5)
    image = out['image'].numpy()[..., 0]
    x, y, z = (int(v) for v in (image[0, 0, 0] // 10000, image[0, 0, 0] // 100 % 100,
                                image[0, 0, 0] % 100))
    window = np.s_[x:x + 8, y:y + 6, z:z + 4]
    np.testing.assert_array_equal(image, code[window])
    np.testing.assert_array_equal(out['labels'].numpy(), labels[window])
    np.testing.assert_array_equal(out['target'].numpy(), code[window] + 0.5)
    np.testing.assert_array_equal(out['brain'].numpy(), code[window] + 0.25)


def test_bias_field_on_a_crop_is_the_crop_of_the_volume_field():
  image, _ = _volume()
  image = image - image.min() + 1.0
  image[0, 0, 0] = 0.0                                     # the background level
  seed = tf.constant([7, 1], tf.int64)
  whole = augment.random_bias_field(image, seed, 0.3).numpy()
  start, size = (5, 3, 2), (8, 6, 3)
  crop = image[5:13, 3:9, 2:5]
  part = augment.random_bias_field(crop, seed, 0.3, image.shape, start, 0.0).numpy()
  np.testing.assert_allclose(part, whole[5:13, 3:9, 2:5], rtol=1e-5, atol=1e-5)
  # Without the volume's place and minimum the crop gets another field.
  assert not np.allclose(augment.random_bias_field(crop, seed, 0.3).numpy(), part,
                         atol=1e-3)


def test_a_crop_larger_than_the_grid_is_refused():
  image, labels = _volume()
  arrays = {'image': image[None], 'labels': labels[None], 'spacing': np.ones((1, 3),
                                                                             np.float32)}
  cfg = test_config.get_config()
  cfg.train.patch_size = (8, 16, 4)                      # Y: 16 > 12
  with pytest.raises(ValueError, match=r'patch_size \(8, 16, 4\) is larger than the grid'):
    input_pipeline.train_dataset(arrays, cfg)
