"""Orbax checkpoints of the train state in ``WORKDIR/checkpoints``."""

from pathlib import Path

from absl import logging
import jax
import orbax.checkpoint as ocp

from wmh_jax import models
from wmh_jax import steps


def checkpoint_manager(workdir, config, read_only=False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_checkpoints, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(Path(workdir).absolute() / 'checkpoints',
                               options=options)


def restore_or_init(manager, state: steps.TrainState) -> steps.TrainState:
  step = manager.latest_step()
  if step is None:
    return state
  logging.info('Resuming from checkpoint at step %d.', step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(config, workdir) -> tuple[models.UNet3D, steps.TrainState]:
  """``(model, state)`` from the latest checkpoint in ``workdir`` (read-only)."""
  manager = checkpoint_manager(workdir, config, read_only=True)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f'{Path(workdir) / "checkpoints"}: no checkpoint '
                              'to restore (train first)')
    model = models.create_model(config.model)
    tx = steps.create_optimizer(config.train)
    state = steps.create_train_state(config, jax.random.PRNGKey(0), model, tx)
    return model, restore_or_init(manager, state)
  finally:
    manager.close()
