import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wmh_jax import losses
from wmh_jax import metrics

BIG = 40.0  # a logit whose sigmoid is 1 to float32 precision


def _logits(pred):
  return jnp.where(jnp.asarray(pred, bool), BIG, -BIG)[None]


def test_perfect_prediction_has_zero_loss():
  labels = np.zeros((8, 8, 4), np.uint8)
  labels[2:5, 2:5, 1:3] = 1
  assert float(losses.soft_dice_loss(_logits(labels == 1), labels[None])) == \
      pytest.approx(0.0, abs=1e-6)


def test_half_overlap_known_value():
  labels = np.zeros((10, 1, 1), np.uint8)
  labels[:4] = 1                       # |G| = 4
  pred = np.zeros((10, 1, 1), bool)
  pred[2:6] = True                     # |P| = 4, |P.G| = 2
  # 1 - (2*2 + 1) / (4 + 4 + 1)
  assert float(losses.soft_dice_loss(_logits(pred), labels[None], smooth=1.0)) == \
      pytest.approx(1 - 5 / 9, abs=1e-6)
  assert metrics.dice(pred, labels) == pytest.approx(0.5)


def test_label_two_is_ignored_not_lesion():
  labels = np.zeros((10, 1, 1), np.uint8)
  labels[:4] = 1
  labels[4:8] = 2
  pred_with_other = np.zeros((10, 1, 1), bool)
  pred_with_other[:8] = True           # lesion + other pathology predicted
  # Predicting the label-2 voxels costs nothing: loss as if only lesion predicted.
  loss = float(losses.soft_dice_loss(_logits(pred_with_other), labels[None], 0.0))
  assert loss == pytest.approx(0.0, abs=1e-6)
  assert metrics.dice(pred_with_other, labels) == pytest.approx(1.0)
  # And missing them costs nothing either (the seed counted them as lesion).
  pred_lesion_only = np.zeros((10, 1, 1), bool)
  pred_lesion_only[:4] = True
  assert float(losses.soft_dice_loss(_logits(pred_lesion_only), labels[None], 0.0)) \
      == pytest.approx(0.0, abs=1e-6)


def test_label_two_is_out_of_the_soft_dice_with_a_soft_target():
  """A perfect prediction scores 0 although the soft target (lesion fraction)
  is non-zero on label-2 voxels, whatever is predicted there; the seed's loss
  kept that target in the denominator (0.147 here)."""
  labels = np.zeros((1, 8, 8, 4), np.uint8)
  labels[0, 2:5, 2:5, 1:3] = 1
  labels[0, 5:7, 5:7, :] = 2
  target = (labels == 1).astype(np.float32)
  target[labels == 2] = 0.4            # some lesion in a mostly 'other' grid voxel
  cfg = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0, 'bce_weight': 1.0})
  for on_other in (False, True):
    pred = (labels[0] == 1) | (on_other & (labels[0] == 2))
    assert float(losses.soft_dice_loss(_logits(pred), labels, 1.0, target)) == \
        pytest.approx(0.0, abs=1e-6)
    assert float(losses.segmentation_loss(_logits(pred), labels, cfg, target)) == \
        pytest.approx(0.0, abs=1e-5)
  # Outside label 2 the soft target still counts: half the lesion missed.
  half = labels[0] == 1
  half[2] = False
  assert float(losses.soft_dice_loss(_logits(half), labels, 1.0, target)) == \
      pytest.approx(1 - (2 * 12 + 1) / (12 + 18 + 1), abs=1e-6)


def test_empty_mask():
  labels = np.zeros((6, 6, 2), np.uint8)
  empty = np.zeros((6, 6, 2), bool)
  assert float(losses.soft_dice_loss(_logits(empty), labels[None], 1.0)) == \
      pytest.approx(0.0, abs=1e-6)
  full = np.ones((6, 6, 2), bool)      # 72 false positives on an empty mask
  assert float(losses.soft_dice_loss(_logits(full), labels[None], 1.0)) == \
      pytest.approx(1 - 1 / 73, abs=1e-6)
  assert metrics.dice(empty, labels) == 1.0
  assert metrics.dice(full, labels) == 0.0


def test_batch_mean_and_dice_bce():
  labels = np.zeros((2, 4, 1, 1), np.uint8)
  labels[0, :2] = 1
  logits = jnp.stack([_logits(labels[0] == 1)[0], _logits(np.ones((4, 1, 1)))[0]])
  per = [0.0, 1 - 1 / 5]               # second sample: 4 false positives, |G| = 0
  assert float(losses.soft_dice_loss(logits, labels, 1.0)) == pytest.approx(
      np.mean(per), abs=1e-6)
  cfg = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0,
                                   'bce_weight': 1.0})
  combined = float(losses.segmentation_loss(logits, labels, cfg))
  # BCE: 4 of 8 voxels are confidently wrong (loss BIG each), 4 right (~0).
  assert combined == pytest.approx(np.mean(per) + BIG * 4 / 8, rel=1e-4)
  with pytest.raises(ValueError):
    losses.segmentation_loss(logits, labels, ml_collections.ConfigDict(
        {'name': 'focal', 'smooth': 1.0, 'bce_weight': 1.0}))


def test_mismatched_shapes_are_refused():
  logits = jnp.zeros((1, 4, 4, 2, 1))
  assert float(losses.soft_dice_loss(logits, np.zeros((1, 4, 4, 2), np.uint8))) >= 0
  with pytest.raises(ValueError, match='do not match'):
    losses.soft_dice_loss(logits, np.zeros((1, 4, 2, 4), np.uint8))


def test_soft_target_equal_to_the_indicator_gives_the_same_loss():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (1, 6, 6, 4)).astype(np.uint8)
  logits = jnp.asarray(rng.normal(size=(1, 6, 6, 4, 1)), jnp.float32)
  cfg = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0, 'bce_weight': 1.0})
  hard = losses.segmentation_loss(logits, labels, cfg)
  soft = losses.segmentation_loss(logits, labels, cfg, (labels == 1).astype(np.float32))
  assert float(soft) == pytest.approx(float(hard), rel=1e-6)


def test_bce_on_a_soft_target_is_lowest_at_that_probability_and_ignores_label_2():
  labels = np.zeros((1, 4, 4, 2), np.uint8)
  labels[0, 0] = 2
  target = np.full(labels.shape, 0.3, np.float32)
  target[0, 0] = 1.0                              # under label 2: ignored
  def bce(p):
    logit = np.log(p / (1 - p))
    return float(losses.bce_loss(jnp.full(labels.shape, logit), labels, target))
  assert bce(0.3) < bce(0.25) and bce(0.3) < bce(0.35)


def test_bce_pos_weight_moves_the_minimum_to_the_weighted_odds():
  # Weighted BCE w*t*log(p) + (1-t)*log(1-p) is lowest at p = w t / (w t + 1 - t).
  labels = np.zeros((1, 4, 4, 2), np.uint8)
  target = np.full(labels.shape, 0.3, np.float32)
  def bce(p, w):
    logit = np.log(p / (1 - p))
    return float(losses.bce_loss(jnp.full(labels.shape, logit), labels, target, w))
  best = 3 * 0.3 / (3 * 0.3 + 0.7)                # 0.5625
  assert bce(best, 3.0) < bce(best - 0.03, 3.0) and bce(best, 3.0) < bce(best + 0.03, 3.0)
  # pos_weight 1 is the plain cross-entropy, written out.
  assert bce(0.2, 1.0) == pytest.approx(-(0.3 * np.log(0.2) + 0.7 * np.log(0.8)), rel=1e-5)
  # Through the config: a missed lesion costs more with pos_weight > 1.
  lab = np.zeros((1, 4, 4, 2), np.uint8)
  lab[0, :2] = 1
  low = jnp.full(lab.shape, -3.0)
  cfg = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0, 'bce_weight': 1.0})
  plain = float(losses.segmentation_loss(low, lab, cfg))
  cfg.pos_weight = 4.0
  assert float(losses.segmentation_loss(low, lab, cfg)) > plain + 1.0


def test_small_lesion_weight_adds_to_small_lesions_only():
  """A one-voxel lesion (lesion mass 1 of 4 around it) weighs 1 + a * 0.75 in
  BCE; a voxel of a large lesion (mass >= 4) and the background as before."""
  labels = np.zeros((1, 16, 16, 8), np.uint8)
  labels[0, 2, 2, 2] = 1                 # alone
  labels[0, 8:12, 8:12, 3:6] = 1         # large: every voxel sees >= 18 of it
  target = labels.astype(np.float32)
  mass = np.asarray(losses.lesion_mass(jnp.asarray(target)))
  assert mass[0, 2, 2, 2] == 1.0 and mass[0, 10, 10, 4] == 4 * 4 * 3
  assert mass[0, 8:12, 8:12, 3:6].min() == 18.0 and mass[0, 5, 2, 2] == 0.0
  logits = jnp.asarray(np.random.default_rng(0).normal(size=labels.shape), jnp.float32)
  plain = float(losses.bce_loss(logits, labels, target))
  assert float(losses.bce_loss(logits, labels, target, small_lesion_weight=0.0)) == plain
  a = 3.0
  weighted = float(losses.bce_loss(logits, labels, target, small_lesion_weight=a))
  extra = a * 0.75 * float(jax.nn.softplus(-logits[0, 2, 2, 2])) / labels.size
  assert weighted - plain == pytest.approx(extra, rel=1e-4)
  # Through the config, with the default mass.
  cfg = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0, 'bce_weight': 1.0})
  base = float(losses.segmentation_loss(logits, labels, cfg, target))
  cfg.small_lesion_weight = a
  assert float(losses.segmentation_loss(logits, labels, cfg, target)) == pytest.approx(
      base + extra, rel=1e-4)
  # With a channel axis, with pos_weight (the lone voxel weighs w + a * 0.75)
  # and with another mass (8: 1 - 1/8 of it).
  five = logits[..., None]
  assert float(losses.bce_loss(five, labels, target[..., None],
                               small_lesion_weight=a)) == pytest.approx(weighted, rel=1e-6)
  w = 2.0
  both = float(losses.bce_loss(logits, labels, target, w, small_lesion_weight=a))
  only_w = float(losses.bce_loss(logits, labels, target, w))
  assert both - only_w == pytest.approx(extra, rel=1e-4)
  wider = float(losses.bce_loss(logits, labels, target, small_lesion_weight=a,
                                small_lesion_mass=8.0))
  assert wider - plain == pytest.approx(extra / 0.75 * (1 - 1 / 8), rel=1e-4)
  with pytest.raises(ValueError, match='small_lesion_mass must be positive'):
    losses.bce_loss(logits, labels, target, small_lesion_weight=a, small_lesion_mass=0.0)


_CFG = ml_collections.ConfigDict({'name': 'dice_bce', 'smooth': 1.0, 'bce_weight': 1.0,
                                  'brain_weight': 1.0})


def _two_channel(seed=0, shape=(2, 8, 6, 4)):
  """Random lesion logits, labels with label 2 inside the brain, a brain fraction,
  and brain logits that are perfect for it."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, shape).astype(np.uint8)
  brain = np.zeros(shape, np.float32)
  brain[:, 1:7, 1:5, 1:3] = 1.0
  labels[brain == 0] = 0
  lesion = jnp.asarray(rng.normal(size=(*shape, 1)), jnp.float32)
  perfect = _logits(brain)[0][..., None]
  return lesion, labels, brain, perfect


def test_lesion_channel_of_a_two_channel_output_gives_todays_loss():
  lesion, labels, brain, perfect = _two_channel()
  two = jnp.concatenate([lesion, perfect], -1)
  one = float(losses.segmentation_loss(lesion, labels, _CFG))
  # Without a brain target the brain channel is ignored: exactly the one-channel loss.
  assert float(losses.segmentation_loss(two, labels, _CFG)) == one
  # Perfect brain logits: ~0 brain loss on top.
  with_brain = float(losses.segmentation_loss(two, labels, _CFG, brain=brain,
                                              has_brain=np.ones(2)))
  assert with_brain == pytest.approx(one, abs=1e-5)
  # Wrong where label 2 lies inside the brain: counted (not ignored, unlike lesion).
  wrong = np.asarray(perfect).copy()
  wrong[labels == 2] = -BIG
  assert float(losses.brain_loss(jnp.asarray(wrong), brain)) > 0.1
  cfg = _CFG.copy_and_resolve_references()
  cfg.brain_weight = 2.0
  bad = jnp.concatenate([lesion, jnp.asarray(wrong)], -1)
  np.testing.assert_allclose(
      float(losses.segmentation_loss(bad, labels, cfg, brain=brain)),
      one + 2.0 * float(losses.brain_loss(jnp.asarray(wrong), brain)), rtol=1e-5)


def test_examples_without_a_brain_mask_contribute_nothing():
  lesion, labels, brain, perfect = _two_channel()
  wrong = jnp.full(perfect.shape, -BIG)          # "no brain anywhere"
  two = jnp.concatenate([lesion, wrong], -1)
  one = float(losses.segmentation_loss(lesion, labels, _CFG))
  none = losses.segmentation_loss(two, labels, _CFG, brain=brain, has_brain=np.zeros(2))
  assert float(none) == pytest.approx(one, abs=1e-6)
  # One of two with a mask: half of that example's brain loss (batch mean).
  first = float(losses.brain_loss(wrong[:1], brain[:1]))
  assert first > 1.0
  half = losses.segmentation_loss(two, labels, _CFG, brain=brain,
                                  has_brain=np.array([1.0, 0.0]))
  assert float(half) == pytest.approx(one + first / 2, rel=1e-5)


def test_brain_gradient_reaches_channel_one_only_from_the_brain_term():
  lesion, labels, brain, _ = _two_channel()
  rng = np.random.default_rng(1)
  two = jnp.concatenate([lesion, jnp.asarray(rng.normal(size=lesion.shape),
                                             jnp.float32)], -1)

  def grad(has):
    return jax.grad(lambda x: losses.segmentation_loss(
        x, labels, _CFG, brain=brain, has_brain=np.asarray(has, np.float32)))(two)

  g = grad([1.0, 1.0])
  g_lesion = jax.grad(lambda x: losses.segmentation_loss(x, labels, _CFG))(lesion)
  g_brain = jax.grad(lambda x: losses.brain_loss(x, brain))(two[..., 1:])
  np.testing.assert_allclose(g[..., :1], g_lesion, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g[..., 1:], g_brain, rtol=1e-5, atol=1e-9)
  assert float(jnp.abs(g[..., 1:]).max()) > 0
  # No brain mask: no gradient at all on channel 1 (the example's).
  g = grad([0.0, 1.0])
  assert float(jnp.abs(g[0, ..., 1]).max()) == 0.0
  assert float(jnp.abs(g[1, ..., 1]).max()) > 0.0
