"""The train state, the optimiser and the pure train and predict steps.

Kept apart from the training loop (``train.py``) so that predict and benchmark
load without TensorFlow.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from wmh_jax import losses


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: a plain pytree (no methods, no closures)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up to ``learning_rate``, then cosine decay to a fraction of it."""
  lr = train_config.learning_rate
  warmup = max(1, min(train_config.warmup_steps, train_config.num_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=lr / warmup, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(train_config.num_steps, warmup + 1),
      end_value=lr * train_config.end_learning_rate_fraction)


def create_optimizer(train_config) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config)
  parts = []
  if train_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=train_config.weight_decay)
               if train_config.weight_decay else optax.adam(schedule))
  return optax.chain(*parts)


def input_shape(config) -> tuple[int, ...]:
  """A training batch's shape (a None patch size: that axis of ``data.grid``)."""
  patch = config.train.patch_size or config.data.grid
  grid = tuple(g if p is None else p for p, g in zip(patch, config.data.grid))
  return (config.train.batch_size, *grid, 1)


def create_train_state(config, rng: jax.Array, model, tx) -> TrainState:
  """The step-0 state: ``model``'s initial variables and ``tx``'s state.

  ``model.init`` runs jit-compiled, as one program: run op by op, every layer's
  operations were dispatched and compiled one at a time (~45 s for the default
  U-Net on a 2-core CPU, against ~5 s), with the same values.
  """
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(rng, jnp.zeros(input_shape(config), jnp.float32))
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict, rng: jax.Array | None = None, *,
               model, tx, loss_config) -> tuple[TrainState, dict]:
  """One optimiser step on ``batch = {'image': (B,X,Y,Z,1), 'labels': (B,X,Y,Z)}``
  (plus ``'target'``, a soft lesion fraction of the labels' shape, when trained on
  soft targets; ``'brain'``, the brain fraction, and ``'has_brain'`` (B,) for a
  model with a brain output).

  Pure: the same (state, batch) gives the same result. ``rng`` is unused (the
  U-Net has no stochastic layer); it stays until train.py stops passing it.
  """
  del rng

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      logits, updates = model.apply(variables, batch['image'], train=True,
                                    mutable=['batch_stats'])
    else:
      logits = model.apply(variables, batch['image'], train=True)
      updates = {'batch_stats': state.batch_stats}
    loss = losses.segmentation_loss(logits, batch['labels'], loss_config,
                                    batch.get('target'), batch.get('brain'),
                                    batch.get('has_brain'))
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'params_finite': jnp.all(jnp.array([jnp.all(jnp.isfinite(p))
                                                 for p in jax.tree.leaves(params)]))}
  return new_state, metrics


def predict_logits(params, batch_stats, images, *, model) -> jax.Array:
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return model.apply(variables, images, train=False)


# predict_logits compiled once per network (flax modules of one config are
# equal and hash alike; the weights are arguments) and input shape: validation,
# the refiner's fit, evaluate's two splits and predict share it. A jit of a new
# functools.partial compiled anew each time (~6 s for the default's network on
# a 2-core CPU). The compiled functions stay cached for the process's life
# (jax's cache, one per network and shape).
predict_logits_jit = jax.jit(predict_logits, static_argnames='model')


def inference_weights(state: TrainState) -> TrainState:
  """``state`` with its params and batch_stats on the first device, as
  :data:`predict_logits_jit` takes them everywhere. jax caches a compiled
  function per argument sharding too: training's replicated weights and a
  restored checkpoint's would each compile the network again (~25 s for the
  default's three grid depths on a 2-core CPU in the main job's evaluate)."""
  device = jax.devices()[0]
  return state.replace(params=jax.device_put(state.params, device),
                       batch_stats=jax.device_put(state.batch_stats, device))


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over all devices (one device is a mesh of one)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
