r"""The seed U-Net in JAX and in PyTorch, timed side by side on this machine.

  .venv/bin/pip install torch==2.13.0 && \
      .venv/bin/python bench/torch_side_by_side.py [--batches=1,2] [--steps=5]

torch is not a dependency of wmh_jax: install it only to run this script. Add
``--grid=32,32,8`` for a check that takes seconds.

Builds the default network (``configs/default.py``) twice: the Flax model of
``wmh_jax.models`` with its jitted train and predict steps, and the same U-Net
written with ``torch.nn.Conv3d`` (layout N, C, D=Z, H=X, W=Y; a JAX kernel
``(kx, ky, kz)`` is a torch kernel ``(kz, kx, ky)``), eager, in two memory
formats: contiguous and channels_last_3d. The torch models get the JAX initial
weights, and the script first checks that the two give the same logits and the
same first gradient norm. Both train with soft Dice on whole volumes (labels in
{0, 1}); JAX with Adam after global-norm clipping to 1 (its optimiser), torch
with ``torch.optim.Adam(lr=3e-4)`` after ``clip_grad_norm_(1.0)``, the same work.

Timing: two warm-up calls of each (JAX is compiled ahead of time first and the
compile time reported apart), then ``--steps`` rounds that alternate JAX, torch
contiguous, torch channels_last_3d, so that load from other processes hits all
alike. Prints one JSON line per (batch, phase): median, min and max seconds (per
step for 'train_step', per volume for 'inference'), and the ratio of the JAX
median to the median of the faster torch memory format. The torch input is
handed over already in N, C, D, H, W (the JAX model transposes its one-channel
input inside, which costs next to nothing).
"""

import copy
import functools
import json
import os
import statistics
import time
import warnings

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from configs import default
from wmh_jax import convs
from wmh_jax import host_memory
from wmh_jax import machine
from wmh_jax import models
from wmh_jax import steps

flags.DEFINE_list('batches', ['1', '2'], 'Batch sizes to time.')
flags.DEFINE_integer('steps', 5, 'Timed rounds per (batch, phase).')
flags.DEFINE_list('grid', None, 'X,Y,Z of the volumes; default config.data.grid.')
flags.DEFINE_bool('keep_freed_memory', True,
                  'glibc keeps freed memory (wmh_jax.host_memory), for both frameworks, '
                  'as launch.py does; false: the allocator as the process starts.')
FLAGS = flags.FLAGS

FORMATS = {'contiguous': torch.contiguous_format,
           'channels_last_3d': torch.channels_last_3d}


def _conv(cin: int, cout: int, kernel) -> nn.Conv3d:
  """'same' convolution; torch pads an even kernel as XLA does (extra on the right)."""
  # For an even kernel torch pads a copy of the input, and warns: XLA pads too.
  warnings.filterwarnings('ignore', "Using padding='same' with even kernel")
  kx, ky, kz = kernel
  return nn.Conv3d(cin, cout, (kz, kx, ky), padding='same')


def _block(cin: int, filters, kernel) -> nn.Sequential:
  layers = []
  for f in filters:
    layers += [_conv(cin, f, kernel), nn.ReLU(inplace=True)]
    cin = f
  return nn.Sequential(*layers)


class TorchUNet3D(nn.Module):
  """``wmh_jax.models.UNet3D`` without normalisation, on ``(B, 1, Z, X, Y)``.

  The convolutions are registered in the order Flax creates them, so
  :func:`load_flax_params` can pair them up.
  """

  def __init__(self, mc):
    super().__init__()
    self.pools = [(p[2], p[0], p[1]) for p in mc.pool_sizes]  # (pz, px, py)
    self.encoder = nn.ModuleList()
    cin, skips = 1, []
    for filters, kernel in zip(mc.encoder_filters, mc.kernel_sizes):
      self.encoder.append(_block(cin, filters, kernel))
      cin = filters[-1]
      skips.append(cin)
    self.bottleneck = _block(cin, mc.bottleneck_filters, mc.bottleneck_kernel)
    cin = mc.bottleneck_filters[-1]
    self.decoder = nn.ModuleList()  # deepest level first
    for level in reversed(range(len(skips))):
      f = mc.decoder_filters[level]
      self.decoder.append(nn.ModuleList([
          _block(cin, (f,), mc.pool_sizes[level]),
          _block(f + skips[level], (f, f), mc.kernel_sizes[level])]))
      cin = f
    self.head = nn.Conv3d(cin, 1, 1)
    nn.init.constant_(self.head.bias, mc.output_bias)

  def forward(self, x):
    skips = []
    for block, pool in zip(self.encoder, self.pools):
      x = block(x)
      skips.append(x)
      x = F.max_pool3d(x, pool)
    x = self.bottleneck(x)
    for (up, block), skip, pool in zip(self.decoder, skips[::-1], self.pools[::-1]):
      x = up(F.interpolate(x, scale_factor=pool, mode='nearest'))
      x = block(torch.cat([x, skip], dim=1))
    return self.head(x)


def load_flax_params(model: nn.Module, params) -> None:
  """Copies the Flax ``params`` into ``model`` (kernels (kx,ky,kz,I,O) -> (O,I,kz,kx,ky))."""
  blocks = sorted((k for k in params if k.startswith('ConvBlock_')),
                  key=lambda k: int(k.split('_')[1]))
  flax_convs = [params[b][f'Conv3D_{j}'] for b in blocks for j in range(len(params[b]))]
  flax_convs.append(params['Conv3D_0'])
  torch_convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
  with torch.no_grad():
    for conv, p in zip(torch_convs, flax_convs, strict=True):
      kernel = np.transpose(np.asarray(p['kernel']), (4, 3, 2, 0, 1))
      conv.weight.copy_(torch.tensor(kernel))
      conv.bias.copy_(torch.tensor(np.asarray(p['bias'])))


def dice_loss(logits, target, smooth: float = 1.0):
  """``wmh_jax.losses.soft_dice_loss`` for labels in {0, 1}."""
  prob = torch.sigmoid(logits)
  dims = tuple(range(1, logits.ndim))
  inter = (prob * target).sum(dims)
  denom = prob.sum(dims) + target.sum(dims)
  return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


class JaxRunner:
  """The jitted (ahead-of-time compiled) train and predict steps of wmh_jax."""

  def __init__(self, config, image, labels):
    model = models.create_model(config.model)
    tx = steps.create_optimizer(config.train)
    self.state = steps.create_train_state(config, jax.random.PRNGKey(0), model, tx)
    self.batch = {'image': jnp.asarray(image), 'labels': jnp.asarray(labels)}
    self.rng = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    self._step = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx,
                          loss_config=config.loss),
        donate_argnums=0).lower(self.state, self.batch, self.rng).compile()
    self.train_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self._predict = jax.jit(functools.partial(steps.predict_logits, model=model)).lower(
        self.state.params, self.state.batch_stats, self.batch['image']).compile()
    self.predict_compile_s = time.perf_counter() - t0
    self.grad_norms = []

  def logits(self):
    return self._predict(self.state.params, self.state.batch_stats,
                         self.batch['image']).block_until_ready()

  def train(self):
    self.state, metrics = self._step(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))
    self.grad_norms.append(float(metrics['grad_norm']))

  def infer(self):
    self.logits()


class TorchRunner:
  """Eager train and inference steps of :class:`TorchUNet3D` in one memory format."""

  def __init__(self, model, memory_format, image, labels):
    self.model = model.to(memory_format=memory_format)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-4)
    to_ncdhw = lambda a: torch.from_numpy(
        np.ascontiguousarray(np.moveaxis(a[..., None], (4, 3), (1, 2)))).float()
    self.image = to_ncdhw(image[..., 0]).contiguous(memory_format=memory_format)
    self.target = to_ncdhw(labels).contiguous(memory_format=memory_format)
    self.grad_norms = []

  def logits(self):
    with torch.inference_mode():
      return self.model(self.image)

  def train(self):
    self.opt.zero_grad(set_to_none=True)
    loss = dice_loss(self.model(self.image), self.target)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.grad_norms.append(float(norm))

  def infer(self):
    self.logits()


def _alternate(fns: dict, rounds: int) -> dict:
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def _stats(prefix: str, times, scale: float) -> dict:
  t = [s * scale for s in times]
  return {f'{prefix}_median_s': round(statistics.median(t), 4),
          f'{prefix}_min_s': round(min(t), 4), f'{prefix}_max_s': round(max(t), 4)}


def _print(record: dict) -> None:
  print(json.dumps({'bench': 'side_by_side', **record, **machine.describe()}),
        flush=True)


def main(_):
  # Before either framework starts its threads: it holds for the whole process.
  kept = FLAGS.keep_freed_memory and host_memory.keep_freed_memory()
  torch.set_num_threads(os.cpu_count())
  config = default.get_config()
  config.loss.name = 'dice'
  config.model.brain_output = False  # the seed's one-channel head (as the torch twin)
  config.train.patch_size = None
  if FLAGS.grid:
    config.data.grid = tuple(int(n) for n in FLAGS.grid)
  grid = tuple(config.data.grid)
  common = {'grid': grid, 'rounds': FLAGS.steps, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'jax_version': jax.__version__,
            'torch_version': torch.__version__, 'keep_freed_memory': kept,
            'jax_conv_impl': convs.resolve_name(config.model.conv_impl,
                                               norm=config.model.norm)}
  rng = np.random.default_rng(0)

  for batch in (int(b) for b in FLAGS.batches):
    config.train.batch_size = batch
    image = rng.normal(size=(batch, *grid, 1)).astype(np.float32)
    labels = (rng.random((batch, *grid)) < 0.02).astype(np.uint8)
    jx = JaxRunner(config, image, labels)
    base = TorchUNet3D(config.model)
    load_flax_params(base, jx.state.params)
    th = {name: TorchRunner(copy.deepcopy(base), fmt, image, labels)
          for name, fmt in FORMATS.items()}

    jax_params = sum(p.size for p in jax.tree_util.tree_leaves(jx.state.params))
    torch_params = sum(p.numel() for p in base.parameters())
    ref = np.asarray(jx.logits())[..., 0]  # (B, X, Y, Z)
    diffs = {name: float(np.abs(np.moveaxis(r.logits().numpy()[:, 0], 1, 3) - ref).max())
             for name, r in th.items()}
    _print({'phase': 'check', 'batch': batch, 'jax_params': jax_params,
            'torch_params': torch_params, 'logits_max_abs': float(np.abs(ref).max()),
            'logits_max_abs_diff': diffs, **common})
    if jax_params != torch_params:
      raise SystemExit(f'parameter counts differ: {jax_params} vs {torch_params}')

    for phase, scale in (('train_step', 1.0), ('inference', 1.0 / batch)):
      fns = {'jax': jx.train if phase == 'train_step' else jx.infer,
             **{f'torch_{n}': (r.train if phase == 'train_step' else r.infer)
                for n, r in th.items()}}
      warmup = _alternate(fns, 2)
      times = _alternate(fns, FLAGS.steps)
      record = {'phase': phase, 'batch': batch,
                'unit': 's_per_step' if phase == 'train_step' else 's_per_volume'}
      for name, t in times.items():
        record.update(_stats(name, t, scale))
      best = min(FORMATS, key=lambda n: record[f'torch_{n}_median_s'])
      record['torch_memory_format'] = best
      record['torch_median_s'] = record[f'torch_{best}_median_s']
      record['ratio_jax_over_torch'] = round(
          record['jax_median_s'] / record['torch_median_s'], 3)
      record['jax_compile_s'] = round(
          jx.train_compile_s if phase == 'train_step' else jx.predict_compile_s, 2)
      record['warmup_s'] = {n: [round(s * scale, 3) for s in t] for n, t in warmup.items()}
      if phase == 'train_step':  # same weights and data: the first norms must agree
        record['first_grad_norm'] = {'jax': jx.grad_norms[0],
                                     **{n: r.grad_norms[0] for n, r in th.items()}}
      record['loadavg_1m'] = round(os.getloadavg()[0], 2)
      _print({**record, **common})


if __name__ == '__main__':
  app.run(main)
