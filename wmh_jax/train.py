"""The training loop: ``train_and_evaluate(config, workdir)``."""

import functools
import time
from pathlib import Path

from absl import logging
from clu import metric_writers
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import convs
from wmh_jax import data
from wmh_jax import inference
from wmh_jax import input_pipeline
from wmh_jax import metrics
from wmh_jax import models
from wmh_jax import refine
from wmh_jax import run_record
from wmh_jax import steps
from wmh_jax import subjects


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


def _probabilities(predict_fn, state, image) -> np.ndarray:
  logits = predict_fn(state.params, state.batch_stats, image[None, ..., None])
  return np.asarray(jax.nn.sigmoid(logits))[0]


def validation_dice(predict_fn, state, val_arrays, config, brain: bool = False
                    ) -> dict[str, float]:
  """Mean per-subject Dice on the grid (each subject's own with
  ``data.grid_max_depth``; label 2 ignored): ``val/dice_grid``;
  with a ``brain`` output, lesions outside the predicted brain are dropped
  (``inference.native_probability`` on the grid) and ``val/brain_dice_grid`` is
  the brain mask's Dice on the subjects with one. With ``image_brain``
  (data.input_norm='brain') the lesion comes from that input, z-scored in the
  given brain (inference's second pass, with the true brain instead of its
  own), and the brain from ``image`` (its first)."""
  scores, brain_scores = [], []
  state = steps.inference_weights(state)  # compiled as evaluate's and predict's
  for i in range(len(val_arrays['image'])):
    v = input_pipeline.subject_arrays(val_arrays, i)  # its own depth
    labels = v['labels']
    p = _probabilities(predict_fn, state, v['image'])
    lesion = p[..., 0] if 'image_brain' not in v else _probabilities(
        predict_fn, state, v['image_brain'])[..., 0]
    prob, mask = inference.native_probability(
        (lesion, p[..., 1]) if brain else lesion, labels.shape, config.predict)
    scores.append(metrics.dice(prob >= config.predict.threshold, labels))
    if mask is not None and v.get('has_brain', 0):
      brain_scores.append(challenge_metrics.dice(v['brain'] >= 0.5, mask))
  out = {'val/dice_grid': float(np.mean(scores)) if scores else float('nan')}
  if brain_scores:
    out['val/brain_dice_grid'] = float(np.nanmean(brain_scores))
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
  """Trains on the configured dataset, checkpointing into ``workdir``.

  Writes ``WORKDIR/config.json`` and ``WORKDIR/split.json`` (``run_record``)
  before the first step. Running it again with the same workdir resumes from
  the latest checkpoint, refused when the network (``model.*``, ``data.grid``)
  or the split is not the recorded one.
  """
  workdir = Path(workdir)
  if config.train.batch_size % jax.device_count():
    raise ValueError(f'train.batch_size={config.train.batch_size} must be a '
                     f'multiple of the {jax.device_count()} devices')
  prior = None
  if config.refine.enabled:
    refine.check_rules(config.refine)      # a bad rule fails now, not after training
    if not refine.path_for(workdir, config.train.num_steps).is_dir():
      prior = prior_refiner(config)        # and a missing prior refiner (a resumed run
                                           # whose refiner exists needs none)
  subjects.input_norm(config.data)         # and a bad data.input_norm
  subjects.brain_norm_fraction(config.data)  # or brain_norm_fraction
  # Bad data, or a split that is not the one of the run resumed, fails here.
  sets, split = data.load_run_data(config, workdir, ('train', 'val'))
  train_set, val_set = sets['train'], sets['val']
  init_from = config.train.get('init_from', '')
  # WORKDIR/config.json and split.json before the first step (a resumed run's
  # are kept; its network and split were checked against them).
  run_record.record(workdir, config, split)
  brain = config.model.brain_output
  brain_norm = brain and subjects.input_norm(config.data) == 'brain'
  train_arrays = input_pipeline.stack_prepared(
      train_set, soft_targets=config.loss.soft_targets, brain=brain,
      brain_norm=brain_norm)
  val_arrays = input_pipeline.stack_prepared(val_set, brain=brain,
                                             brain_norm=brain_norm)
  if brain_norm and 'image_brain' not in train_arrays:
    logging.warning('data.input_norm=brain: no training subject has brain.nii.gz, so '
                    'training shows the network only its head-z-scored input; '
                    'inference takes the lesion from the brain-z-scored one')
  if brain and 'brain' not in train_arrays:
    logging.warning('model.brain_output: no training subject has brain.nii.gz; the '
                    'brain channel stays untrained and predict/evaluate ignore it')

  model = models.create_model(config.model)
  tx = steps.create_optimizer(config.train)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = steps.create_train_state(config, init_rng, model, tx)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s parameters, conv impl %s.', f'{n_params:,}',
               convs.resolve_name(config.model.conv_impl, norm=config.model.norm))
  manager = checkpoints.checkpoint_manager(workdir, config)
  # A new run with train.init_from starts from that run's weights (step 0).
  state = checkpoints.restore_or_init(manager, state, init_from, tx)
  start = int(state.step)
  # WORKDIR/environment.json: where and with what this start computes.
  if jax.process_index() == 0:
    run_record.record_environment(workdir, start, config.train.num_steps, init_from)

  mesh = steps.make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  state = jax.device_put(state, replicated)
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      loss_config=config.loss), donate_argnums=0)
  predict_fn = functools.partial(steps.predict_logits_jit, model=model)
  schedule = steps.learning_rate_schedule(config.train)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(flat_hparams(config))
  num_steps = config.train.num_steps
  batches = input_pipeline.train_dataset(train_arrays, config, start).as_numpy_iterator()
  logging.info('Training steps %d..%d on %d subjects (%d held out).', start + 1,
               num_steps, len(train_set), len(val_set))
  # Step metrics stay on the device until a log or checkpoint step needs them
  # (no host sync every step); fetched ones wait in `host` for the next log.
  # `windows`: seconds a step took in each log window, timed once its metrics are
  # on the host (the steps are done, not just dispatched).
  unchecked, host, windows = [], [], []
  t_log, step_log = time.time(), start
  try:
    for step in range(start + 1, num_steps + 1):
      batch = jax.device_put(next(batches), batch_sharding)
      state, m = step_fn(state, batch, step_rng)
      unchecked.append(m)
      is_last = step == num_steps
      is_log = step % config.train.log_every_steps == 0 or is_last
      is_checkpoint = step % config.train.checkpoint_every_steps == 0 or is_last
      if is_log or is_checkpoint:  # never log or save a non-finite state
        fetched = jax.device_get(unchecked)
        _check_finite(fetched, step - len(fetched) + 1, manager)
        host += fetched
        unchecked = []
      if is_log:
        now = time.time()
        windows.append((now - t_log) / (step - step_log))
        t_log, step_log = now, step
        scalars = {'train/loss': float(np.mean([h['loss'] for h in host])),
                   'train/grad_norm': float(np.mean([h['grad_norm'] for h in host])),
                   'train/learning_rate': float(schedule(step - 1)),
                   'train/steps_per_sec': 1 / windows[-1]}
        writer.write_scalars(step, scalars)
        logging.info('step %d/%d  loss %.4f  lr %.2e  %.2f s/step  ETA %s', step,
                     num_steps, scalars['train/loss'], scalars['train/learning_rate'],
                     windows[-1], eta(windows, num_steps - step))
        host = []
      if step % config.train.eval_every_steps == 0 or is_last:
        vd = validation_dice(predict_fn, state, val_arrays, config,
                             inference.has_brain_output(model, state))
        writer.write_scalars(step, vd)
        logging.info('step %d: validation Dice (grid) %.4f%s', step, vd['val/dice_grid'],
                     f', brain Dice (grid) {vd["val/brain_dice_grid"]:.4f}'
                     if 'val/brain_dice_grid' in vd else '')
      if is_checkpoint:
        manager.save(step, args=ocp.args.StandardSave(state))
  finally:  # a save in flight completes, even when the run stops on an error
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  fit_refiner(config, workdir, train_set, model, state, prior)
  return state


def prior_refiner(config) -> dict | None:
  """The refiner blended into the one this run fits (``refine.prior_weight``
  above 0): that of ``train.init_from``'s latest checkpoint, the one its
  predict applies. None when the weight is 0.

  Raises (one line, before training):
    ValueError: a weight outside [0, 1], or above 0 without ``train.init_from``,
      or a prior that decides other candidates (``refine.check_prior``).
    FileNotFoundError: ``train.init_from`` has no checkpoint, or no refiner for
      its latest.
  """
  rc = config.refine
  weight = refine.prior_weight(rc)
  if not weight:
    return None
  source = config.train.get('init_from', '')
  if not source:
    raise ValueError(f'refine.prior_weight={weight}: blends in the refiner of '
                     'train.init_from, which is not set (set the weight to 0)')
  step = checkpoints.latest_step(source)
  if step is None:
    raise FileNotFoundError(f'train.init_from={source}: no checkpoint, so no refiner '
                            f'to blend in at refine.prior_weight={weight} (set the '
                            'weight to 0, or train that run first)')
  prior = refine.load(source, step)
  if prior is None:
    raise FileNotFoundError(f'train.init_from={source}: no refiner to blend in at '
                            f'refine.prior_weight={weight} ({refine.path_for(source, step)}'
                            ' is missing; set the weight to 0)')
  refine.check_prior(prior, rc)
  logging.info('refine: the refiner of %s (U-Net step %d) takes %g of the one this '
               'run fits', source, step, weight)
  return prior


def refiner_cases(config, train_set, model, state,
                  segmenter=None) -> list[tuple]:
  """``(U-Net probability, z-scored FLAIR, spacing, labels)`` on the native grid
  of ``config.refine.num_subjects`` training subjects, evenly spread over the
  sorted list (every site): what ``refine.fit`` takes. The probability is the
  one predict and evaluate refine (brain-masked; flip-averaged with
  ``predict.tta``), so the refiner learns the input it will be given.
  ``segmenter``: ``inference.unet_segmenter`` of ``(model, state)`` when the
  caller has one already compiled (made here when None)."""
  n = min(config.refine.num_subjects, len(train_set))
  picks = [train_set[i] for i in np.unique(np.linspace(0, len(train_set) - 1, n)
                                           .round().astype(int))]
  segmenter = segmenter or inference.unet_segmenter(config, model, state)
  cases, t0 = [], time.time()

  def unrefined(p):  # no lesion candidate outside the predicted brain
    return inference.segment(segmenter, inference.ScanInput(
        p['image'], p['native_shape'], p['spacing'], p['source']),
                             before_refine=True)

  for k, (p, seg) in enumerate(inference.in_order(unrefined, picks,
                                                  inference.scans_at_once(config))):
    cases.append((seg.unet_probability, seg.flair_z, p['spacing'], p['native_labels']))
    logging.info('refine: U-Net probability of training subject %d/%d %s (%.0f s)',
                 k + 1, len(picks), p['key'], time.time() - t0)
  return cases


def fit_refiner(config, workdir, train_set, model, state, prior=None) -> None:
  """Fits and saves the native-resolution refiner (``wmh_jax.refine``) on
  ``config.refine.num_subjects`` training subjects, evenly spread over the
  sorted list (every site), unless one exists for this U-Net step; blended with
  ``prior`` (:func:`prior_refiner`) when given."""
  rc, step = config.refine, int(state.step)
  if not rc.enabled or refine.path_for(workdir, step).is_dir():
    return
  if inference.native_flair_missing(
      train_set, 'no refiner fitted, evaluate scores the U-Net alone'):
    return
  t0 = time.time()
  cases = refiner_cases(config, train_set, model, state)
  try:
    refiner = refine.fit(cases, rc, config.seed, step, prior)
  except refine.NothingToFit as e:
    logging.warning('%s; no refiner fitted, evaluate scores the U-Net alone', e)
    return
  path = refine.save(workdir, refiner)
  logging.info('refine: saved %s (%.0f s)', path, time.time() - t0)


def _check_finite(host_metrics: list[dict], first_step: int, manager) -> None:
  """Raises, naming the step, at the first non-finite loss, gradient or weight."""
  for k, h in enumerate(host_metrics):
    bad = [what for what, ok in (('loss', np.isfinite(h['loss'])),
                                 ('gradient', np.isfinite(h['grad_norm'])),
                                 ('weights', bool(h['params_finite']))) if not ok]
    if bad:
      raise FloatingPointError(
          f'non-finite {bad[0]} at step {first_step + k}; stopped. The last good '
          f'checkpoint (step {manager.latest_step()}) is kept in '
          f'{manager.directory}')


# Log windows whose median step time gives the ETA.
ETA_WINDOWS = 10


def eta(windows: list[float], steps_left: int) -> str:
  """The training steps' ETA, e.g. ``'11m24s'``: ``steps_left`` at the median
  seconds a step of the last ``ETA_WINDOWS`` log windows in ``windows``.

  The first window is left out (it holds the step's compile, 30 s or more on a
  CPU), and the median passes over a later window that holds a validation or
  another crop depth's compile. Before a second window: ``'-- (compiling)'``.
  """
  recent = windows[1:][-ETA_WINDOWS:]
  if not steps_left:
    return '0m00s'
  if not recent:
    return '-- (compiling)'
  seconds = int(round(float(np.median(recent)) * steps_left))
  return f'{seconds // 60}m{seconds % 60:02d}s'
