"""The inference library: weights-only restore, and one scan through segment."""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import inference
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import steps
from wmh_jax import subjects


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """``(config, workdir)``: a saved train state (step 5) whose brain channel has a
  bias (so inference uses it), as training saves it."""
  cfg = test_config.get_config()
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.train)
  state = steps.create_train_state(cfg, jax.random.PRNGKey(3), model, tx)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.25 if 'bias' in jax.tree_util.keystr(path) else p,
      state.params)
  state = state.replace(step=jnp.asarray(5, jnp.int32), params=params)
  workdir = tmp_path_factory.mktemp('inference')
  manager = checkpoints.checkpoint_manager(workdir, cfg)
  manager.save(5, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  return cfg, workdir


def test_restore_weights_reads_what_the_full_restore_reads_without_the_optimiser(
    workdir):
  cfg, wd = workdir
  model, state = checkpoints.restore_weights(cfg, wd)
  _, full = checkpoints.restore_latest(cfg, wd)
  assert int(state.step) == 5 and state.opt_state is None
  assert model.brain_output == cfg.model.brain_output
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((full.params, full.batch_stats))):
    assert a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_restore_weights_refuses_another_architecture_in_one_line(workdir):
  cfg, wd = workdir
  cfg = cfg.copy_and_resolve_references()
  cfg.model.brain_output = not cfg.model.brain_output
  with pytest.raises(ValueError, match='stored shape') as e:
    checkpoints.restore_weights(cfg, wd)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='trained with model.brain_output'):
    inference.load_members(cfg, wd)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    checkpoints.restore_weights(cfg, wd / 'nothing')


def test_in_order_yields_in_order_with_at_most_workers_in_hand_and_stops_at_an_error():
  lock, started, live, most = threading.Lock(), [], [0], [0]

  def fn(x):
    with lock:
      started.append(x)
      live[0] += 1
      most[0] = max(most[0], live[0])
    time.sleep(0.02 * (2 - x % 3))   # an item often finishes before the one ahead
    with lock:
      live[0] -= 1
    if x == 5:
      raise ValueError('item 5')
    return x * x

  for workers in (1, 2, 3):
    started.clear()
    most[0] = 0
    assert list(inference.in_order(fn, range(5), workers)) == [
        (0, 0), (1, 1), (2, 4), (3, 9), (4, 16)]
    assert most[0] == workers and sorted(started) == list(range(5))
  # An error comes at its item, after the ones before it; nothing more starts.
  started.clear()
  got = []
  with pytest.raises(ValueError, match='item 5'):
    for _, r in inference.in_order(fn, iter(range(100)), 2):
      got.append(r)
  assert got == [0, 1, 4, 9, 16] and max(started) <= 6
  # A caller that stops early leaves no item running and starts none.
  started.clear()
  gen = inference.in_order(fn, range(100), 2)
  assert [next(gen), next(gen)] == [(0, 0), (1, 1)]
  gen.close()
  assert live[0] == 0 and max(started) <= 3


def _scan(tmp_path, rng):
  from conftest import write_tiny_subject  # pylint: disable=g-import-not-at-top
  write_tiny_subject(tmp_path / 's', rng)
  return tmp_path / 's' / 'pre' / 'FLAIR.nii.gz', tmp_path / 's' / 'wmh.nii.gz'


def test_training_weights_and_restored_weights_share_one_compiled_network(workdir):
  # Training validates with its replicated state, evaluate and predict with a
  # restored checkpoint: one compiled network for both (jax caches per sharding).
  cfg, wd = workdir
  model, restored = checkpoints.restore_weights(cfg, wd)
  mesh = steps.make_mesh()
  trained = jax.device_put(restored, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  # A shape no other test predicts on (jax's cache lives for the whole session).
  image = np.random.default_rng(0).normal(size=(40, 24, 10)).astype(np.float32)
  size = steps.predict_logits_jit._cache_size  # pylint: disable=protected-access
  before = size()
  a = inference.make_probability_fn([(model, trained)])(image)
  assert size() == before + 1
  b = inference.make_probability_fn([(models.create_model(cfg.model), restored)])(image)
  assert size() == before + 1   # the restored weights reuse it
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_segment_is_the_chain_and_the_refiner_keeps_its_candidate(workdir, tmp_path):
  cfg, wd = workdir
  cfg = cfg.copy_and_resolve_references()
  cfg.data.input_norm = 'head'   # one pass (the second: the test after this one)
  flair, wmh = _scan(tmp_path, np.random.default_rng(1))
  segmenter = inference.load(cfg, wd)
  assert segmenter.refiner is None and segmenter.step == 5
  scan = inference.read_scan(flair, cfg)
  # Stopped before refining: the U-Net's native probability and the refiner's input.
  before = inference.segment(segmenter, scan, before_refine=True)
  image, affine = nifti_io.load_image(flair)
  out = segmenter.probability_fn(subjects.preprocess(image, tuple(cfg.data.grid)))
  prob, brain = inference.native_probability(out, image.shape, cfg.predict)
  assert brain is not None and not prob[~brain].any()
  np.testing.assert_array_equal(before.unet_probability, prob)
  np.testing.assert_array_equal(before.mask, prob >= cfg.predict.threshold)
  np.testing.assert_array_equal(before.flair_z, subjects.zscore(image, flair, brain))
  assert not before.refined and before.image is not None
  # A refiner fitted there, saved with a candidate other than the config's.
  labels = nifti_io.load_labels(wmh, affine, image.shape)
  rc = cfg.refine.copy_and_resolve_references()
  candidate = round(0.5 * float(prob[brain].min()), 4)   # every brain voxel
  assert candidate not in (0.0, cfg.refine.candidate)
  rc.update(candidate=candidate, hidden=(4,), num_fits=1, num_steps=20)
  fitted = refine.fit([(prob, before.flair_z, scan.spacing, labels)], rc, 0, 5)
  assert float(fitted['candidate']) == candidate
  refine.save(wd, fitted)
  segmenter = inference.load(cfg, wd)
  assert segmenter.refiner is not None and segmenter.candidate == candidate
  seg = inference.segment(segmenter, scan)
  refined = refine.refine(segmenter.refiner, prob, before.flair_z, scan.spacing, candidate)
  assert seg.refined
  np.testing.assert_array_equal(seg.unet_probability, prob)
  np.testing.assert_array_equal(seg.probability, refined)
  np.testing.assert_array_equal(seg.mask, challenge_metrics.drop_small_lesions(
      refined >= fitted['threshold'], scan.spacing, refine.min_lesion_of(fitted),
      refine.min_area_of(fitted)))
  # The refine step alone, on the segmentation stopped before it, is the same.
  again = inference.refine_segmentation(segmenter, before, scan.spacing)
  assert again.refined and not before.refined
  for field in ('probability', 'mask', 'unet_probability', 'brain', 'flair_z'):
    np.testing.assert_array_equal(getattr(again, field), getattr(seg, field))
  with pytest.raises(ValueError, match='no refiner'):
    inference.refine_segmentation(dataclasses.replace(segmenter, refiner=None),
                                  before, scan.spacing)
  # The refiner's smallest lesion is applied to the final mask: none is that big.
  assert (refined >= fitted['threshold']).any()
  huge = dataclasses.replace(segmenter, refiner={**fitted, 'min_lesion_mm3': 1e12})
  assert not inference.segment(huge, scan).mask.any()
  # And its smallest cross-section on a slice.
  wide = dataclasses.replace(segmenter, refiner={**fitted, 'min_lesion_mm2': 1e12})
  assert not inference.segment(wide, scan).mask.any()
  # A refiner saved before it stored its candidate: 0.02, what every such refiner
  # was fitted with, not the config's (2e-4 since stop 20).
  old = {k: v for k, v in fitted.items() if k != 'candidate'}
  assert cfg.refine.candidate != refine.UNSTORED_CANDIDATE == 0.02
  assert refine.candidate_of(old, cfg.refine.candidate) == 0.02
  assert refine.candidate_of(None, cfg.refine.candidate) == cfg.refine.candidate
  # A scan without its native FLAIR file cannot be refined.
  with pytest.raises(ValueError, match='native FLAIR'):
    inference.segment(segmenter, inference.ScanInput(
        scan.volume, scan.native_shape, scan.spacing, None))


def test_segment_with_brain_norm_takes_the_lesion_from_the_scan_z_scored_in_its_brain(
    workdir, tmp_path):
  cfg, wd = workdir
  cfg = cfg.copy_and_resolve_references()
  cfg.data.input_norm = 'brain'
  grid = tuple(cfg.data.grid)
  flair, _ = _scan(tmp_path, np.random.default_rng(2))
  # The U-Net alone (an earlier test may have saved a refiner in the workdir).
  segmenter = dataclasses.replace(inference.load(cfg, wd), refiner=None)
  scan = inference.read_scan(flair, cfg)
  seg = inference.segment(segmenter, scan)
  image, _ = nifti_io.load_image(flair)
  first = segmenter.probability_fn(subjects.preprocess(image, grid))
  _, brain = inference.native_probability(first, image.shape, cfg.predict)
  second = segmenter.probability_fn(subjects.preprocess(image, grid, flair, brain))
  lesion = inference.native_lesion(inference.split_probability(second)[0],
                                   image.shape, brain, cfg.predict)
  np.testing.assert_array_equal(seg.brain, brain)   # the brain of the first pass
  np.testing.assert_array_equal(seg.unet_probability, lesion)
  np.testing.assert_array_equal(seg.flair_z, subjects.zscore(image, flair, brain))
  assert not lesion[~brain].any()
  # Another lesion than the one pass of data.input_norm='head'.
  head_cfg = cfg.copy_and_resolve_references()
  head_cfg.data.input_norm = 'head'
  head = inference.segment(dataclasses.replace(segmenter, config=head_cfg), scan)
  np.testing.assert_array_equal(head.brain, brain)
  assert np.abs(head.unet_probability - seg.unet_probability).max() > 1e-4
  # Without the native FLAIR (a TFDS example) there is no second pass.
  alone = inference.segment(segmenter, inference.ScanInput(
      scan.volume, scan.native_shape, scan.spacing, None))
  np.testing.assert_array_equal(alone.unet_probability, head.unet_probability)
