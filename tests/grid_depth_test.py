"""A scan's own slices on the grid (``data.grid_max_depth``): the depth rule,
preparation, the padded stack and its crops, inference, and a tiny run."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import NoWeights
from conftest import write_tiny_subject
from configs import test as test_config
from wmh_jax import data
from wmh_jax import evaluate
from wmh_jax import inference
from wmh_jax import input_pipeline
from wmh_jax import nifti_io
from wmh_jax import run_record
from wmh_jax import subjects
from wmh_jax import train


def test_scan_grid_keeps_a_scans_slices_rounded_up_between_the_grid_and_the_maximum():
  grid = (128, 128, 16)
  assert subjects.scan_grid((300, 300, 20), grid) == grid         # no rule: fixed
  assert subjects.scan_grid((300, 300, 20), grid, (0, 4)) == grid
  rule = (32, 4)
  assert subjects.scan_grid((300, 300, 20), grid, rule) == (128, 128, 20)
  assert subjects.scan_grid((300, 300, 21), grid, rule) == (128, 128, 24)
  assert subjects.scan_grid((300, 300, 10), grid, rule) == (128, 128, 16)  # at least
  assert subjects.scan_grid((180, 220, 160), grid, rule) == (128, 128, 32)  # at most


def test_depth_rule_reads_the_config_and_refuses_a_maximum_off_the_step():
  cfg = test_config.get_config()       # grid depth 8, pooling 2 along Z
  assert subjects.depth_rule(cfg) == (0, 4)
  cfg.data.grid_max_depth = 16
  assert subjects.depth_rule(cfg) == (16, 4)
  del cfg.data['grid_max_depth']       # a run's config made before the key
  assert subjects.depth_rule(cfg) == (0, 4)
  for bad in (4, 14):                   # below the grid's depth; not a multiple of 4
    cfg = test_config.get_config()
    cfg.data.grid_max_depth = bad
    with pytest.raises(ValueError, match=f'data.grid_max_depth={bad}'):
      subjects.depth_rule(cfg)
  cfg = test_config.get_config()
  cfg.model.pool_sizes = ((2, 2, 2), (2, 2, 2), (2, 2, 2))   # 8 along Z: the step
  cfg.data.grid_max_depth = 12
  with pytest.raises(ValueError, match='multiple of 8'):
    subjects.depth_rule(cfg)
  cfg.data.grid_max_depth = 16
  assert subjects.depth_rule(cfg) == (16, 8)


def test_prepare_subject_resizes_each_scan_to_its_own_depth(tmp_path):
  rng = np.random.default_rng(0)
  for z in (6, 11, 30):
    write_tiny_subject(tmp_path / 'S' / f'z{z}', rng, shape=(40, 36, z), with_brain=True)
  found = subjects.find_subjects(tmp_path)
  got = {s.id: subjects.prepare_subject(s, (16, 16, 8), depth=(16, 4)) for s in found}
  want = {'z6': 8, 'z11': 12, 'z30': 16}
  for sid, p in got.items():
    shape = (16, 16, want[sid])
    for k in ('image', 'labels', 'lesion_fraction', 'brain_fraction', 'image_brain'):
      assert p[k].shape == shape, (sid, k)
    # A grid voxel's size follows the scan's own grid.
    np.testing.assert_allclose(subjects.grid_spacing(p),
                               p['spacing'] * p['native_shape'] / np.array(shape))
  # Without the rule, every scan is on the config's grid (as before the key).
  assert subjects.prepare_subject(found[0], (16, 16, 8))['image'].shape == (16, 16, 8)
  # The prepared cache keys the rule: the same scan with and without it differ;
  # without one (max_depth 0, what load_run_data passes then) the key is as before.
  s = next(f for f in found if f.id == 'z11')
  assert data._cache_path(tmp_path, s, (16, 16, 8)) == data._cache_path(  # pylint: disable=protected-access
      tmp_path, s, (16, 16, 8), (0, 4))
  assert (data._cache_path(tmp_path, s, (16, 16, 8))  # pylint: disable=protected-access
          != data._cache_path(tmp_path, s, (16, 16, 8), (16, 4)))  # pylint: disable=protected-access
  assert data.prepare_cached(s, (16, 16, 8), tmp_path, (16, 4))['image'].shape[2] == 12
  assert data.prepare_cached(s, (16, 16, 8), tmp_path)['image'].shape[2] == 8


def _prepared(depth, seed):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(12, 12, depth)).astype(np.float32)
  labels = np.zeros((12, 12, depth), np.uint8)
  labels[4:8, 4:8, depth // 2] = 1
  return {'image': image, 'labels': labels, 'lesion_fraction': labels * 0.5,
          'brain_fraction': np.ones_like(image), 'image_brain': image + 1.0,
          'native_shape': np.array((24, 24, depth)), 'spacing': np.ones(3)}


def test_stack_pads_to_the_deepest_and_a_crop_never_sees_the_padding():
  shallow, deep = _prepared(8, 0), _prepared(12, 1)
  arrays = input_pipeline.stack_prepared([shallow, deep], soft_targets=True,
                                        brain=True, brain_norm=True)
  assert arrays['image'].shape == (2, 12, 12, 12)
  np.testing.assert_array_equal(arrays['depth'], [8, 12])
  cut = input_pipeline.subject_arrays(arrays, 0)
  assert 'depth' not in cut
  for k, want in (('image', shallow['image']), ('labels', shallow['labels']),
                  ('target', shallow['lesion_fraction']),
                  ('image_brain', shallow['image_brain'])):
    np.testing.assert_array_equal(cut[k], want)
  # One depth: no 'depth' and the arrays of before the key.
  same = input_pipeline.stack_prepared([shallow, _prepared(8, 2)])
  assert 'depth' not in same and same['image'].shape == (2, 12, 12, 8)
  # The augmented crop of a padded subject is the crop of the subject alone.
  aug = test_config.get_config().augment
  aug.enabled = True
  for s in range(4):
    seed = tf.constant([s, 3], tf.int64)
    padded = {k: v[0] for k, v in arrays.items()}
    alone = input_pipeline.subject_arrays(arrays, 0)
    a = input_pipeline.augment_example(padded, seed, aug, (8, 8, 4), 0.5, 0.5)
    b = input_pipeline.augment_example(alone, seed, aug, (8, 8, 4), 0.5, 0.5)
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_train_dataset_crops_subjects_of_several_depths_and_refuses_to_stack_whole_ones():
  arrays = input_pipeline.stack_prepared([_prepared(8, 0), _prepared(12, 1)],
                                        soft_targets=True)
  cfg = test_config.get_config()
  cfg.train.batch_size = 2
  cfg.train.patch_size = (8, 8, 8)
  batch = next(input_pipeline.train_dataset(arrays, cfg).as_numpy_iterator())
  assert batch['image'].shape == (2, 8, 8, 8, 1) and 'depth' not in batch
  cfg.train.patch_size = (8, 8, 12)        # deeper than the shallow subject
  with pytest.raises(ValueError, match=r'larger than the grid \(12, 12, 8\)'):
    input_pipeline.train_dataset(arrays, cfg)
  cfg.train.patch_size = None            # whole volumes of two depths
  with pytest.raises(ValueError, match='cannot stack them'):
    input_pipeline.train_dataset(arrays, cfg)


def test_model_input_follows_the_scans_slices():
  cfg = test_config.get_config()
  image = np.random.default_rng(0).normal(100, 10, (40, 36, 11)).astype(np.float32)
  assert inference.model_input(image, cfg).shape == (32, 32, 8)
  cfg.data.grid_max_depth = 16
  assert inference.model_input(image, cfg).shape == (32, 32, 12)


def test_a_tiny_run_on_scans_of_several_depths_trains_evaluates_and_predicts(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / 'data'
  for i, z in enumerate((10, 12, 14, 16, 11, 13)):
    write_tiny_subject(root / 'S' / f'{i}', rng, shape=(40, 36, z), with_brain=True)
  cfg = test_config.for_dataset(root, num_steps=4, log_every_steps=2,
                                eval_every_steps=4, checkpoint_every_steps=4,
                                patch_size=(16, 16, None))
  cfg.data.grid_max_depth = 16
  cfg.refine.num_steps = 20
  workdir = tmp_path / 'run'
  train.train_and_evaluate(cfg, workdir)
  depths = sorted(np.load(f)['image'].shape[2] for f in (workdir / 'prepared').glob('*.npz'))
  assert depths == [12, 12, 12, 16, 16, 16]
  summary = evaluate.evaluate(cfg, workdir)
  assert summary['subjects'] >= 1 and np.isfinite(summary['dice_unet_mean'])
  scan = root / 'S' / '3' / 'pre' / 'FLAIR.nii.gz'     # 16 slices: a 16-deep grid
  read = inference.read_scan(scan, cfg)
  assert read.volume.shape == (32, 32, 16)
  seg = inference.segment(inference.load(cfg, workdir), read)
  # Both passes (brain, then the lesion of the scan z-scored in it) on that grid.
  assert cfg.data.input_norm == 'brain' and len(seg.output) == 2
  assert all(np.shape(o) == (32, 32, 16) for o in seg.output)
  assert seg.mask.shape == nifti_io.load_image(scan)[0].shape


def test_the_depth_rule_is_part_of_the_trained_network():
  trained = test_config.get_config()
  before = trained.copy_and_resolve_references()
  del before.data['grid_max_depth']       # a run's config.json made before the key
  assert run_record.first_frozen_change(before, trained) is None
  deeper = trained.copy_and_resolve_references()
  deeper.data.grid_max_depth = 16
  assert run_record.first_frozen_change(before, deeper) == ('data.grid_max_depth', 0, 16)


def test_tfds_refuses_the_depth_rule():
  cfg = test_config.get_config()
  cfg.data.tfds = 'wmh_synthetic'
  cfg.data.grid_max_depth = 16
  with pytest.raises(ValueError, match=r"data.grid_max_depth=16: the TFDS datasets"):
    data.load_run_data(cfg, '/nonexistent')


def test_a_none_patch_depth_crops_every_slice_of_each_subject():
  arrays = input_pipeline.stack_prepared([_prepared(8, 0), _prepared(12, 1)],
                                        soft_targets=True)
  cfg = test_config.get_config()
  cfg.train.patch_size = (8, 8, None)
  depths = set()
  for batch in input_pipeline.train_dataset(arrays, cfg).take(8).as_numpy_iterator():
    assert batch['image'].shape[1:3] == (8, 8)
    depths.add(batch['image'].shape[3])
  assert depths == {8, 12}
  cfg.train.batch_size = 2             # two depths cannot be stacked
  with pytest.raises(ValueError, match='cannot stack them'):
    input_pipeline.train_dataset(arrays, cfg)


def test_a_none_patch_depth_on_one_depth_gives_the_batches_of_that_depth():
  arrays = input_pipeline.stack_prepared([_prepared(8, 0), _prepared(8, 1)],
                                         soft_targets=True)
  cfg = test_config.get_config()
  cfg.augment.enabled = True
  batches = {}
  for patch in ((8, 8, 8), (8, 8, None)):
    cfg.train.patch_size = patch
    batches[patch] = list(input_pipeline.train_dataset(arrays, cfg).take(4)
                          .as_numpy_iterator())
  for a, b in zip(*batches.values()):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_validation_scores_each_subject_on_its_own_depth():
  shallow, deep = _prepared(8, 0), _prepared(12, 1)
  arrays = input_pipeline.stack_prepared([shallow, deep], brain=True)
  seen = []
  def predict_fn(params, batch_stats, x):   # lesion where the input is > 0
    del params, batch_stats
    x = np.asarray(x)[..., 0]
    seen.append(x.shape[1:])
    return np.stack([np.where(x > 0, 10.0, -10.0), np.full_like(x, 10.0)], -1)
  state = NoWeights()
  cfg = test_config.get_config()
  both = train.validation_dice(predict_fn, state, arrays, cfg, True)['val/dice_grid']
  assert seen == [(12, 12, 8), (12, 12, 12)]
  alone = [train.validation_dice(predict_fn, state, input_pipeline.stack_prepared(
      [p], brain=True), cfg, True)['val/dice_grid'] for p in (shallow, deep)]
  assert both == pytest.approx(np.mean(alone))
