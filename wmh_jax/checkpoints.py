"""Orbax checkpoints of the train state in ``WORKDIR/checkpoints``."""

import gc
import logging as std_logging
from pathlib import Path
import sys
import time

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from wmh_jax import models
from wmh_jax import steps


def checkpoint_manager(workdir, config, read_only=False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_checkpoints, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(Path(workdir).absolute() / 'checkpoints',
                               options=options)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: one line naming it and what is wrong."""


def _reason(e: BaseException) -> str:
  """The first line of the innermost cause of ``e``: orbax wraps TensorStore's
  one-line reason (``OUT_OF_RANGE: ... value of size 1000``) in a page of spec."""
  while e.__cause__ is not None or (e.__context__ is not None
                                    and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  line = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {line[:300]}' if line else type(e).__name__


def _first_non_finite(tree) -> str | None:
  """The path of the first floating-point leaf of ``tree`` with a NaN or inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      return jax.tree_util.keystr(path)
  return None


def _require_finite(tree, what: str):
  """``tree``, or one :class:`CheckpointError` line when a leaf holds a NaN or
  inf: ``{what} holds non-finite values (NaN or inf in {path})``."""
  bad = _first_non_finite(tree)
  if bad:
    raise CheckpointError(f'{what} holds non-finite values (NaN or inf in {bad})')
  return tree


def _leftover(exc) -> bool:
  """A failure of an array read still in flight when a restore failed."""
  text = f'{type(exc).__name__}: {exc}'
  return 'Event loop is closed' in text or 'while reading array index' in text


def _silence_leftovers() -> None:
  """Drops, from now on, the reports of the reads a failed restore left behind.

  Orbax reads the arrays concurrently and stops at the first failure, closing
  its event loop. The reads still in flight then fail on the closed loop
  (TensorStore prints each through ``sys.excepthook``) or are collected with
  their failure never retrieved (``sys.unraisablehook``, the asyncio logger):
  hundreds of lines of TensorStore spec, at any later moment. Anything else
  passes through to the hooks that were there.
  """
  if getattr(sys.excepthook, 'wmh_jax_leftovers', False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, value, tb):
    if not _leftover(value):
      excepthook(kind, value, tb)

  def quiet_unraisablehook(unraisable):
    if not _leftover(unraisable.exc_value):
      unraisablehook(unraisable)

  quiet_excepthook.wmh_jax_leftovers = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
  std_logging.getLogger('asyncio').addFilter(
      lambda r: not ('never retrieved' in r.getMessage()
                     and 'while reading array index' in r.getMessage()))


def _read(read, fail: str):
  """``read()`` of an orbax checkpoint; a failure (a truncated or unreadable
  file) as one :class:`CheckpointError` line: ``fail`` with its ``{reason}`` filled in.

  The reports of reads left in flight are silenced before the read starts, not
  after it failed: they can arrive at any moment, while the manager closes too.
  Orbax's own ``ValueError`` on a stored shape that differs passes through.
  """
  _silence_leftovers()
  reason = None
  try:
    return read()
  except Exception as e:  # orbax and TensorStore raise many types
    if isinstance(e, ValueError) and 'stored shape' in str(e):
      raise
    reason = _reason(e)
  # Outside the except: its traceback (and the reads it holds) is released here.
  gc.collect()
  raise CheckpointError(fail.replace('{reason}', reason))


def restore_step(manager, step: int, state: steps.TrainState) -> steps.TrainState:
  """Checkpoint ``step`` of ``manager`` onto ``state``'s shapes.

  Raises:
    CheckpointError: it cannot be read (a truncated or missing file) or holds a
      NaN or inf (a write that was never checked, a flipped bit).
    ValueError: orbax's own, when an array has another shape (another
      ``model.*``: predict words it).
  """
  where = Path(manager.directory) / str(step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = _read(
      lambda: manager.restore(step, args=ocp.args.StandardRestore(abstract)),
      f'{where}: cannot restore the checkpoint ({{reason}})')
  return _require_finite(restored, f'{where}: the checkpoint')


def _set_aside(manager, step: int) -> Path | None:
  """Moves a bad step out of ``manager``'s directory (orbax would otherwise never
  save that step again: it skips steps at or below its latest) into
  ``checkpoints.broken/``, kept for inspection."""
  src = Path(manager.directory) / str(step)
  if jax.process_index() or not src.is_dir():
    return None
  dst = src.parent.with_name(src.parent.name + '.broken') / src.name
  dst.parent.mkdir(exist_ok=True)
  if dst.exists():
    dst = dst.with_name(f'{src.name}.{time.strftime("%Y%m%d-%H%M%S")}')
  src.rename(dst)
  manager.reload()
  return dst


def restore_or_init(manager, state: steps.TrainState, init_from: str = '',
                    tx=None, fallback: bool = True) -> steps.TrainState:
  """The latest good checkpoint in ``manager``, else ``state``, or with
  ``init_from`` (a trained workdir) ``state`` with that run's weights
  (``initialise_from``).

  With ``fallback`` (training) a checkpoint that fails :func:`restore_step` is
  skipped with a warning and the one before it tried (orbax keeps
  ``train.max_checkpoints``); once one restores, the bad ones are moved to
  ``checkpoints.broken/``. Without ``fallback`` the latest is refused.

  Raises:
    CheckpointError: without ``fallback`` the latest is bad; with, all are (then
      none is moved: the next run must not silently start from scratch).
  """
  all_steps = sorted(manager.all_steps(), reverse=True)
  if not all_steps:
    return initialise_from(init_from, state, tx) if init_from else state
  if init_from:
    logging.info('train.init_from=%s ignored: %s already holds a checkpoint '
                 '(it only seeds a new run)', init_from, manager.directory)
  bad = []
  for step in all_steps:
    try:
      restored = restore_step(manager, step, state)
    except CheckpointError as e:
      if not fallback:
        raise
      logging.warning('%s; trying the checkpoint before it', e)
      bad.append(step)
      continue
    for b in bad:
      moved = _set_aside(manager, b)
      if moved:
        logging.warning('%s moved to %s', Path(manager.directory) / str(b), moved)
    logging.info('Resuming from checkpoint at step %d.', step)
    return restored
  raise CheckpointError(f'{manager.directory}: none of the checkpoints (steps '
                        f'{", ".join(map(str, all_steps))}) restores; see the '
                        'warnings above')


def restore_latest(config, workdir) -> tuple[models.UNet3D, steps.TrainState]:
  """``(model, state)`` from the latest checkpoint in ``workdir`` (read-only).

  Raises:
    FileNotFoundError: there is none.
    CheckpointError: it cannot be restored or holds non-finite values.
  """
  manager = checkpoint_manager(workdir, config, read_only=True)
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f'{Path(workdir) / "checkpoints"}: no checkpoint '
                              'to restore (train first)')
    model = models.create_model(config.model)
    tx = steps.create_optimizer(config.train)
    state = steps.create_train_state(config, jax.random.PRNGKey(0), model, tx)
    return model, restore_or_init(manager, state, fallback=False)
  finally:
    manager.close()


def abstract_weights(config, model) -> dict:
  """``{step, params[, batch_stats]}`` of ``model`` as shapes and dtypes
  (``jax.eval_shape``: nothing initialised or compiled)."""
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jax.numpy.zeros(steps.input_shape(config), jax.numpy.float32),
      train=False))
  wanted = {'step': jax.ShapeDtypeStruct((), jax.numpy.int32),
            'params': variables['params']}
  if variables.get('batch_stats'):
    wanted['batch_stats'] = variables['batch_stats']
  return wanted


def _weights_manager(directory: Path) -> ocp.CheckpointManager:
  """A read-only manager that restores a part of a saved train state."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=ocp.PyTreeCheckpointHandler())


def latest_step(workdir) -> int | None:
  """The step of ``workdir``'s latest checkpoint (the one ``initialise_from``
  and inference take), None when it holds none; nothing is restored."""
  directory = Path(workdir).absolute() / 'checkpoints'
  if not directory.is_dir():
    return None
  manager = _weights_manager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _stored_weights(manager, step: int) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` of checkpoint ``step`` as stored
  shapes (its metadata; no array is read); a missing part is ``{}``."""
  meta = manager.item_metadata(step)
  meta = getattr(meta, 'tree', meta)
  if meta is None:
    raise FileNotFoundError('its metadata is missing (no default/_METADATA)')
  return {k: meta.get(k) or {} for k in ('params', 'batch_stats')}


def _restore_part(manager, step: int, abstract: dict):
  """The subtrees of ``abstract`` from checkpoint ``step`` (orbax partial restore:
  the optimiser state is never read)."""
  return manager.restore(step, args=ocp.args.PyTreeRestore(
      item=abstract, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))


def restore_weights(config, workdir) -> tuple[models.UNet3D, steps.TrainState]:
  """``(model, state)`` for inference from the latest checkpoint in ``workdir``:
  the step, params and batch_stats only, onto abstract shapes (no train state
  initialised, nothing compiled); ``state.opt_state`` is None.

  Raises:
    FileNotFoundError: there is none.
    ValueError: its parameters have other shapes (another ``model.*``); the
      message holds ``stored shape``.
    CheckpointError: it cannot be restored or holds non-finite values.
  """
  directory = Path(workdir).absolute() / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{Path(workdir) / "checkpoints"}: no checkpoint to '
                            'restore (train first)')
  model = models.create_model(config.model)
  manager = _weights_manager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{Path(workdir) / "checkpoints"}: no checkpoint '
                              'to restore (train first)')
    where = directory / str(step)
    fail = f'{where}: cannot restore the checkpoint ({{reason}})'
    wanted = abstract_weights(config, model)
    have = _read(lambda: _stored_weights(manager, step), fail)
    bad = _first_mismatch(_flat_shapes({k: wanted.get(k, {}) for k in have}),
                          _flat_shapes(have))
    if bad:
      raise ValueError(f'{where}: a stored shape differs from the model: {bad}')
    restored = _read(lambda: _restore_part(manager, step, wanted), fail)
  finally:
    manager.close()
  state = steps.TrainState(step=restored['step'], params=restored['params'],
                           batch_stats=restored.get('batch_stats', {}), opt_state=None)
  return model, _require_finite(state, f'{where}: the checkpoint')


def _flat_shapes(tree) -> dict[str, tuple]:
  """``{'a/b/kernel': shape}`` of the array leaves of a nested dict."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_mismatch(want: dict, have: dict) -> str | None:
  """Where ``have`` (a checkpoint's shapes) does not fit ``want`` (the model's)."""
  for path, shape in want.items():
    if path not in have:
      return f'{path} {shape} is not in it'
    if have[path] != shape:
      return f'{path} is {have[path]} there, {shape} here'
  extra = [p for p in have if p not in want]
  return f'it has {extra[0]} {have[extra[0]]}, which this model lacks' if extra else None


def initialise_from(source, state: steps.TrainState, tx) -> steps.TrainState:
  """``state`` with the params and batch_stats of ``source``'s latest checkpoint.

  Fine-tuning: the step is 0 and the optimiser state fresh (``tx.init``), so the
  current config's schedule runs from its start. Only those two subtrees are read
  (orbax partial restore onto ``state``'s shapes; nothing compiled).

  Raises:
    FileNotFoundError: ``source`` holds no checkpoint.
    ValueError: the checkpoint's parameters differ from ``state``'s in tree
      structure or shape (another architecture); one line, naming the first.
    CheckpointError: the checkpoint cannot be read (a truncated or unreadable
      file) or holds a NaN or inf; one line naming it and the reason.
  """
  directory = Path(source).absolute() / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'train.init_from={source}: no checkpoint to start '
                            f'from ({directory} does not exist; train that run first)')
  manager = _weights_manager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'train.init_from={source}: no checkpoint to start '
                              f'from in {directory} (train that run first)')
    where = directory / str(step)
    fail = (f'train.init_from={source}: cannot restore its checkpoint {where} '
            '({reason})')
    have = _read(lambda: _stored_weights(manager, step), fail)
    wanted = {'params': state.params}
    if state.batch_stats:
      wanted['batch_stats'] = state.batch_stats
    bad = _first_mismatch(_flat_shapes(wanted), _flat_shapes(have))
    if bad:
      raise ValueError(f'train.init_from={source}: its checkpoint (step {step}) is '
                       f'another architecture: {bad} (model.* must match that run)')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
    restored = _read(lambda: _restore_part(manager, step, abstract), fail)
  finally:
    manager.close()
  _require_finite(restored, f'train.init_from={source}: its checkpoint {where}')
  logging.info('Initialised from %s step %d (params%s; step 0, fresh optimiser '
               'state).', source, step,
               ' and batch_stats' if state.batch_stats else '')
  params = restored['params']
  return state.replace(step=jax.numpy.zeros_like(state.step), params=params,
                       batch_stats=restored.get('batch_stats', state.batch_stats),
                       opt_state=tx.init(params) if tx is not None else state.opt_state)
