"""Train state, the pure train step, and ``train_and_evaluate(config, workdir)``."""

import functools
import time
from pathlib import Path
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from wmh_jax import data
from wmh_jax import input_pipeline
from wmh_jax import losses
from wmh_jax import metrics
from wmh_jax import models


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
  grid = tuple(config.train.patch_size or config.data.grid)
  return (config.train.batch_size, *grid, 1)


def create_train_state(config, rng: jax.Array, model, tx) -> TrainState:
  variables = model.init(rng, jnp.zeros(input_shape(config), jnp.float32),
                         train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model, tx,
               loss_config) -> tuple[TrainState, dict]:
  """One optimiser step on ``batch = {'image': (B,X,Y,Z,1), 'labels': (B,X,Y,Z)}``.

  Pure: the same (state, batch, rng) gives the same result. ``rng`` is folded
  with the step, so a model with stochastic layers sees fresh noise each step.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      logits, updates = model.apply(variables, batch['image'], train=True,
                                    mutable=['batch_stats'],
                                    rngs={'dropout': step_rng})
    else:
      logits = model.apply(variables, batch['image'], train=True,
                           rngs={'dropout': step_rng})
      updates = {'batch_stats': state.batch_stats}
    loss = losses.segmentation_loss(logits, batch['labels'], loss_config)
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  return new_state, metrics


def predict_logits(params, batch_stats, images, *, model) -> jax.Array:
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return model.apply(variables, images, train=False)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over all devices (one device is a mesh of one)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def checkpoint_manager(workdir, config, read_only=False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_checkpoints, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(Path(workdir).absolute() / 'checkpoints',
                               options=options)


def restore_or_init(manager, state: TrainState) -> TrainState:
  step = manager.latest_step()
  if step is None:
    return state
  logging.info('Resuming from checkpoint at step %d.', step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
  out = {}
  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(f'{prefix}{k}.', v)
      else:
        out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  walk('', config)
  return out


def validation_dice(predict_fn, state, val_arrays, threshold) -> float:
  """Mean per-subject Dice on the config grid (label 2 ignored)."""
  scores = []
  for image, labels in zip(val_arrays['image'], val_arrays['labels']):
    logits = predict_fn(state.params, state.batch_stats, image[None, ..., None])
    prob = np.asarray(jax.nn.sigmoid(logits))[0, ..., 0]
    scores.append(metrics.dice(prob >= threshold, labels))
  return float(np.mean(scores)) if scores else float('nan')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains on the configured dataset, checkpointing into ``workdir``.

  Running it again with the same workdir resumes from the latest checkpoint.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.train.batch_size % jax.device_count():
    raise ValueError(f'train.batch_size={config.train.batch_size} must be a '
                     f'multiple of the {jax.device_count()} devices')
  train_set, val_set = data.load_splits(config, workdir)
  train_arrays = input_pipeline.stack_prepared(train_set, config.data.grid)
  val_arrays = input_pipeline.stack_prepared(val_set, config.data.grid)

  model = models.create_model(config.model)
  tx = create_optimizer(config.train)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(config, init_rng, model, tx)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s parameters, conv impl %s.', f'{n_params:,}',
               models.resolve_conv_impl(config.model.conv_impl))
  manager = checkpoint_manager(workdir, config)
  state = restore_or_init(manager, state)
  start = int(state.step)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  state = jax.device_put(state, replicated)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx,
                                      loss_config=config.loss), donate_argnums=0)
  predict_fn = jax.jit(functools.partial(predict_logits, model=model))
  schedule = learning_rate_schedule(config.train)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(flat_hparams(config))
  num_steps = config.train.num_steps
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                             writer=writer, every_steps=None,
                                             every_secs=None,
                                             on_steps=range(0, num_steps + 1,
                                                            config.train.log_every_steps))
  batches = input_pipeline.train_dataset(train_arrays, config, start).as_numpy_iterator()
  logging.info('Training steps %d..%d on %d subjects (%d held out).', start + 1,
               num_steps, len(train_set), len(val_set))
  t0, step_metrics = time.time(), []
  for step in range(start + 1, num_steps + 1):
    batch = jax.device_put(next(batches), batch_sharding)
    state, m = step_fn(state, batch, step_rng)
    step_metrics.append(m)
    progress(step)
    is_last = step == num_steps
    if step % config.train.log_every_steps == 0 or is_last:
      host = jax.device_get(step_metrics)
      loss = np.array([h['loss'] for h in host])
      if not np.all(np.isfinite(loss)):
        bad = step - len(loss) + 1 + int(np.argmin(np.isfinite(loss)))
        raise FloatingPointError(f'non-finite loss at step {bad}; the last '
                                 'good checkpoint is kept in '
                                 f'{workdir / "checkpoints"}')
      elapsed = time.time() - t0
      rate = (step - start) / elapsed
      scalars = {'train/loss': float(loss.mean()),
                 'train/grad_norm': float(np.mean([h['grad_norm'] for h in host])),
                 'train/learning_rate': float(schedule(step - 1)),
                 'train/steps_per_sec': rate}
      writer.write_scalars(step, scalars)
      logging.info('step %d/%d  loss %.4f  lr %.2e  %.2f s/step  ETA %s', step,
                   num_steps, scalars['train/loss'], scalars['train/learning_rate'],
                   1 / rate, _eta((num_steps - step) / rate))
      step_metrics = []
    if step % config.train.eval_every_steps == 0 or is_last:
      vd = validation_dice(predict_fn, state, val_arrays, config.evaluate.threshold)
      writer.write_scalars(step, {'val/dice_grid': vd})
      logging.info('step %d: validation Dice (grid) %.4f', step, vd)
    if step % config.train.checkpoint_every_steps == 0 or is_last:
      if step_metrics and not np.isfinite(float(step_metrics[-1]['loss'])):
        raise FloatingPointError(f'non-finite loss at step {step}; checkpoint '
                                 'not written')
      manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return state


def _eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s'
