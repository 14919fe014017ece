"""Segmentation losses as pure jnp functions with an ignore mask.

Labels are {0 background, 1 WMH, 2 other pathology}; voxels labelled 2 are left
out of the lesion loss entirely (the seed wrongly counted them as lesion): out of
the prediction and out of the target, hard or soft, so they weigh in neither the
numerator nor the denominator of the soft Dice. A model with a
brain output (two channels) adds a brain loss on channel 1, for the examples
that have a brain mask.
"""

import jax
import jax.numpy as jnp


def _match(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Labels with the logits' shape; a channel axis of 1 may be missing on either."""
  if labels.shape == logits.shape:
    return labels
  if labels.shape == logits.shape[:-1] and logits.shape[-1] == 1:
    return labels[..., None]
  raise ValueError(f'labels of shape {labels.shape} do not match logits of '
                   f'shape {logits.shape}')


def targets_and_mask(labels: jax.Array, target: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """``(target, valid mask)`` as float32 from {0, 1, 2} labels: the lesion
  indicator, or a given soft ``target`` (the lesion fraction of each voxel), zero
  where the label is 2 (a grid voxel mostly 'other pathology' may still hold some
  lesion fraction: it must not count in a loss that ignores the voxel)."""
  mask = (labels != 2).astype(jnp.float32)
  if target is None:
    return (labels == 1).astype(jnp.float32), mask
  return target.astype(jnp.float32) * mask, mask


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0,
                   target: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of ``1 - (2|P.G| + s) / (|P| + |G| + s)``.

  Args:
    logits: ``(B, ...)`` pre-sigmoid scores.
    labels: integer labels of the logits' shape, or of that shape without the
      logits' trailing channel axis of 1.
    smooth: added to numerator and denominator; an empty mask predicted empty
      gives loss 0.
    target: optional soft target in [0, 1] of the labels' shape (the lesion
      fraction); label-2 voxels stay ignored.

  Label-2 voxels count in neither ``P`` nor ``G``: a prediction equal to the
  target outside them scores 0 whatever it and the target hold on them.
  """
  target, mask = targets_and_mask(_match(logits, labels), _soft(logits, target))
  prob = jax.nn.sigmoid(logits) * mask
  axes = tuple(range(1, logits.ndim))
  inter = jnp.sum(prob * target, axes)
  denom = jnp.sum(prob, axes) + jnp.sum(target, axes)
  return jnp.mean(1.0 - (2.0 * inter + smooth) / (denom + smooth))


# The neighbourhood (grid voxels, X Y Z) whose lesion mass tells a small lesion.
SMALL_LESION_WINDOW = (5, 5, 3)


def lesion_mass(target: jax.Array) -> jax.Array:
  """Each voxel's lesion mass: the sum of ``target`` (B, X, Y, Z[, 1]) over the
  ``SMALL_LESION_WINDOW`` around it (edges padded with 0). A voxel of a lesion
  of one or two grid voxels has little; one inside a large lesion has much."""
  window = (1, *SMALL_LESION_WINDOW, 1)[:target.ndim]
  return jax.lax.reduce_window(target, 0.0, jax.lax.add, window,
                               (1,) * target.ndim, 'SAME')


def bce_loss(logits: jax.Array, labels: jax.Array,
             target: jax.Array | None = None, pos_weight: float = 1.0,
             small_lesion_weight: float = 0.0, small_lesion_mass: float = 4.0
             ) -> jax.Array:
  """Binary cross-entropy averaged over the non-ignored voxels; the lesion term
  weighs ``pos_weight`` times the background term (as torch's
  ``BCEWithLogitsLoss(pos_weight=...)``): above 1, a missed lesion voxel costs
  more than a false one. With ``small_lesion_weight`` = a, a lesion voxel's term
  weighs ``pos_weight + a * max(0, 1 - mass / small_lesion_mass)`` times the
  background's, its :func:`lesion_mass` the ``mass``: small lesions count up to
  a more, large ones as before. Raises ValueError for a weight with a
  ``small_lesion_mass`` that is not positive."""
  if small_lesion_weight and not small_lesion_mass > 0:
    raise ValueError(f'loss.small_lesion_mass must be positive with '
                     f'loss.small_lesion_weight={small_lesion_weight}, not '
                     f'{small_lesion_mass}')
  target, mask = targets_and_mask(_match(logits, labels), _soft(logits, target))
  per_voxel = jnp.maximum(logits, 0) - logits * target + jnp.log1p(
      jnp.exp(-jnp.abs(logits)))
  # The lesion term, -t log sigmoid(x) = t softplus(-x), once more times the
  # extra weight (at none the graph is the plain loss's: runs stay bit-for-bit
  # reproducible).
  if pos_weight != 1.0 or small_lesion_weight:
    extra = pos_weight - 1.0
    if small_lesion_weight:
      small = jnp.clip(1.0 - lesion_mass(target) / small_lesion_mass, 0.0, 1.0)
      extra = extra + small_lesion_weight * small
    per_voxel = per_voxel + extra * target * jax.nn.softplus(-logits)
  return jnp.sum(per_voxel * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _soft(logits, target):
  return None if target is None else _match(logits, target)


def split_channels(logits: jax.Array, labels: jax.Array
                   ) -> tuple[jax.Array, jax.Array | None]:
  """``(lesion logits, brain logits or None)``: a trailing channel axis of 2
  (one more axis than ``labels``) holds the lesion and the brain logit."""
  if logits.ndim == labels.ndim + 1 and logits.shape[-1] == 2:
    return logits[..., :1], logits[..., 1:]
  return logits, None


def brain_loss(logits: jax.Array, brain: jax.Array, has_brain: jax.Array | None = None,
               smooth: float = 1.0) -> jax.Array:
  """Soft Dice + BCE of the brain logits against the brain fraction, per example,
  weighted by ``has_brain`` (1 or 0 per example) and averaged over the batch:
  examples without a brain mask contribute nothing. No voxel is ignored (label-2
  voxels lie inside the brain)."""
  brain = _match(logits, brain).astype(jnp.float32)
  axes = tuple(range(1, logits.ndim))
  prob = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * jnp.sum(prob * brain, axes) + smooth) / (
      jnp.sum(prob, axes) + jnp.sum(brain, axes) + smooth)
  bce = jnp.mean(jnp.maximum(logits, 0) - logits * brain + jnp.log1p(
      jnp.exp(-jnp.abs(logits))), axes)
  weight = (jnp.ones(logits.shape[:1]) if has_brain is None
            else jnp.asarray(has_brain, jnp.float32).reshape(logits.shape[:1]))
  return jnp.sum(weight * (dice + bce)) / logits.shape[0]


def segmentation_loss(logits, labels, loss_config, target=None, brain=None,
                      has_brain=None) -> jax.Array:
  """The configured lesion loss, 'dice' or 'dice_bce', on ``target`` when given;
  for two-channel logits (``split_channels``) with a ``brain`` fraction, plus
  ``loss.brain_weight`` times :func:`brain_loss` on channel 1."""
  logits, brain_logits = split_channels(logits, labels)
  dice = soft_dice_loss(logits, labels, loss_config.smooth, target)
  if loss_config.name == 'dice':
    loss = dice
  elif loss_config.name == 'dice_bce':
    loss = dice + loss_config.bce_weight * bce_loss(
        logits, labels, target, loss_config.get('pos_weight', 1.0),
        loss_config.get('small_lesion_weight', 0.0),
        loss_config.get('small_lesion_mass', 4.0))
  else:
    raise ValueError(f'loss.name must be dice or dice_bce, got {loss_config.name!r}')
  if brain_logits is None or brain is None:
    return loss
  return loss + loss_config.get('brain_weight', 1.0) * brain_loss(
      brain_logits, brain, has_brain, loss_config.smooth)
