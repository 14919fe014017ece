r"""Benchmark mode: one JSON line per measured setting, numbers only.

  python launch.py --config=configs/default.py --mode=benchmark
  python launch.py --mode=benchmark --config.benchmark.conv_impls="('native','fold2d')" \
      --config.benchmark.batch_sizes="(1,2)" --config.benchmark.dtype=bfloat16

For every conv implementation x batch size: compile seconds; train-step median,
min and max over ``steps`` timed steps after ``warmup`` (``block_until_ready``);
inference seconds per volume; voxels/s; FLOPs per step from XLA's cost analysis;
achieved FLOP/s and its fraction of the peak a matmul micro-benchmark reaches on
the same device; the same for the FLOPs the step would do with direct
convolutions ('direct_equivalent_*': Winograd does fewer for the same result);
whether glibc keeps freed memory (``config.keep_freed_memory``, set by launch.py);
the ``XLA_FLAGS`` the step ran under (oneDNN: ``config.xla_cpu_onednn``);
peak host RSS and device memory; the machine (``wmh_jax.machine``: CPU model,
cores, AVX-512/AMX, device). A last line times the tf.data
pipeline alone against the train step's consumption. Inputs are random arrays on
the config grid: the timings do not depend on the data.
"""

import functools
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wmh_jax import convs
from wmh_jax import host_memory
from wmh_jax import input_pipeline
from wmh_jax import machine
from wmh_jax import models
from wmh_jax import steps


def _timed(fn, n: int) -> list[float]:
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def matmul_peak_flops(dtype='float32', n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of an ``n x n`` matmul on the default device (a practical peak)."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.dtype(dtype))
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2.0 * n ** 3 / min(_timed(lambda: mm(a, b), repeats))


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def _setting_config(config, impl: str, batch: int) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.model.conv_impl = impl
  cfg.model.dtype = config.benchmark.dtype
  cfg.train.batch_size = batch
  cfg.train.patch_size = tuple(config.data.grid)  # whole volumes
  return cfg


def _random_batch(cfg, rng: np.random.Generator) -> dict:
  shape = steps.input_shape(cfg)
  return {'image': rng.normal(size=shape).astype(np.float32),
          'labels': (rng.random(shape[:-1]) < 0.01).astype(np.uint8)}


def direct_flops(cfg, state, batch_arrays, rng) -> float | None:
  """XLA's FLOPs for the train step with direct convolutions (fold2d).

  Winograd and the sub-pixel up-convolutions do fewer multiply-adds for the same
  result; dividing these FLOPs by the step time gives the direct-equivalent rate
  that compares with other implementations and frameworks. Counted on the
  lowered (unoptimised) step: nothing is compiled.
  """
  direct = ml_collections.ConfigDict(cfg.to_dict())
  direct.model.conv_impl = 'fold2d'
  model = models.create_model(direct.model)
  step = jax.jit(functools.partial(steps.train_step, model=model,
                                   tx=steps.create_optimizer(direct.train),
                                   loss_config=direct.loss))
  return _flops(step.lower(state, batch_arrays, rng))


def benchmark_setting(config, impl: str, batch: int, peak: float) -> dict:
  """Times one (conv implementation, batch size) setting; returns its record."""
  bc = config.benchmark
  cfg = _setting_config(config, impl, batch)
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.train)
  state = steps.create_train_state(cfg, jax.random.PRNGKey(cfg.seed), model, tx)
  batch_arrays = _random_batch(cfg, np.random.default_rng(cfg.seed))
  rng = jax.random.PRNGKey(1)
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      loss_config=cfg.loss), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, rng).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  flops_direct = direct_flops(cfg, state, batch_arrays, rng)

  def one_step():
    nonlocal state
    state, m = compiled(state, batch_arrays, rng)
    return m['loss']

  _timed(one_step, bc.warmup)
  times = _timed(one_step, bc.steps)
  predict = jax.jit(functools.partial(steps.predict_logits, model=model)).lower(
      state.params, state.batch_stats, batch_arrays['image']).compile()
  infer = lambda: predict(state.params, state.batch_stats, batch_arrays['image'])
  _timed(infer, 1)
  infer_times = _timed(infer, max(3, bc.steps // 2))
  median = statistics.median(times)
  voxels = batch * int(np.prod(cfg.train.patch_size))
  dev = jax.devices()[0]
  return {
      'bench': 'train_step', 'backend': jax.default_backend(),
      'device_kind': dev.device_kind, 'device_count': jax.device_count(),
      'conv_impl': convs.resolve_name(impl, norm=cfg.model.norm),
      'dtype': cfg.model.dtype,
      'batch': batch, 'grid': list(cfg.train.patch_size),
      'keep_freed_memory': bool(cfg.get('keep_freed_memory', False)),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),  # oneDNN: config.xla_cpu_onednn
      'tf_enable_onednn_opts': os.environ.get('TF_ENABLE_ONEDNN_OPTS', ''),  # and TF's
      'compile_s': round(compile_s, 3),
      'step_median_s': round(median, 6), 'step_min_s': round(min(times), 6),
      'step_max_s': round(max(times), 6), 'steps_timed': len(times),
      'inference_s_per_volume': round(statistics.median(infer_times) / batch, 6),
      'voxels_per_s': round(voxels / median, 1),
      'flops_per_step': flops,
      'achieved_flops_per_s': None if flops is None else round(flops / median, 1),
      'peak_matmul_flops_per_s': round(peak, 1),
      'fraction_of_peak': None if flops is None else round(flops / median / peak, 4),
      'flops_per_step_direct': flops_direct,
      'direct_equivalent_flops_per_s': (None if flops_direct is None
                                        else round(flops_direct / median, 1)),
      'direct_equivalent_fraction_of_peak': (
          None if flops_direct is None else round(flops_direct / median / peak, 4)),
      'peak_host_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 / 1024, 1),
      'device_peak_bytes': _device_peak_bytes(),
  }


def benchmark_pipeline(config, step_seconds: float) -> dict:
  """Batches/s of the tf.data pipeline alone (augmentation on) vs the step's need."""
  bc = config.benchmark
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.train.batch_size = bc.batch_sizes[0]
  cfg.train.patch_size = None  # whole volumes, as the timed train step
  grid = tuple(cfg.data.grid)
  rng = np.random.default_rng(0)
  n = 8
  arrays = {'image': rng.normal(size=(n, *grid)).astype(np.float32),
            'labels': (rng.random((n, *grid)) < 0.01).astype(np.uint8),
            'spacing': np.tile(np.float32([1.7, 1.9, 6.0]), (n, 1))}
  it = input_pipeline.train_dataset(arrays, cfg).as_numpy_iterator()
  for _ in range(3):
    next(it)  # start the workers
  n_batches = max(10, bc.steps)
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(it)
  rate = n_batches / (time.perf_counter() - t0)
  need = 1.0 / step_seconds
  return {'bench': 'input_pipeline', 'batch': cfg.train.batch_size,
          'grid': list(grid), 'batches_per_s': round(rate, 2),
          'train_step_batches_per_s': round(need, 3),
          'pipeline_over_step': round(rate / need, 1)}


def benchmark(config) -> list[dict]:
  """Runs every setting of ``config.benchmark``; prints and returns the records."""
  bc = config.benchmark
  peak = matmul_peak_flops(bc.dtype)
  records, where = [], machine.describe()
  for impl in bc.conv_impls:
    for batch in bc.batch_sizes:
      records.append({**benchmark_setting(config, impl, batch, peak), **where})
      print(json.dumps(records[-1]), flush=True)
      jax.clear_caches()
      host_memory.release_freed_memory()  # the next setting's buffers differ
  if bc.pipeline:
    records.append({**benchmark_pipeline(config, records[0]['step_median_s']),
                    **where})
    print(json.dumps(records[-1]), flush=True)
  return records
