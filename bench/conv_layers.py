r"""Seconds per layer kind of the seed network: 3-D vs folded 2-D convolutions.

  .venv/bin/python bench/conv_layers.py [--repeats=5] [--batch=1] [--impls=fold2d,winograd]

For each convolution of the default U-Net at its level's size on the 128x128x16
grid (batch 1), and for pooling and upsampling, times the forward pass and the
gradient (forward and backward, to input and kernel) under jit, for

- ``native``: one ``lax.conv_general_dilated`` in 3-D;
- ``fold2d_xla``: slices folded into the batch (depth-shifted copies stacked on
  channels for kz > 1), XLA's own 2-D convolution and its own gradient;
- ``fold2d``: the same with ``convs.conv2d_im2col_grad``, whose kernel gradient is
  one im2col matmul;
- ``winograd``: fold2d with the 3x3 convolutions by ``wmh_jax.winograd`` F(4x4,
  3x3), and the decoder's up-convolutions (nearest upsampling, then a kernel of
  the upsampling's size) as ``convs.upconv_nearest`` at the low resolution (what
  the model uses on CPU).

Prints one JSON line per (layer, implementation): median, min and max seconds
over the repeats after one compiling run, and GFLOP/s of the direct convolution
on the full grid (2 * MACs forward, twice that for the gradient) whatever the
implementation does: Winograd and sub-pixel do fewer multiply-adds, so theirs are
direct-equivalent rates. Like launch.py, it first has glibc keep freed memory
(``--nokeep_freed_memory``: as the process starts).
"""

import functools
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax

from wmh_jax import host_memory
from wmh_jax import convs
from wmh_jax import models

flags.DEFINE_integer('repeats', 5, 'Timed runs per setting.')
flags.DEFINE_integer('batch', 1, 'Batch size.')
flags.DEFINE_bool('keep_freed_memory', True, 'See wmh_jax.host_memory.')
flags.DEFINE_list('impls', ['native', 'fold2d_xla', 'fold2d', 'winograd'],
                  'Implementations to time.')
FLAGS = flags.FLAGS

# (name, (Z, X, Y) of the output, cin, cout, (kx, ky, kz), up-convolution): the
# seed network's convolution kinds, the decoder's up-convolutions included (their
# input is the (Z, X, Y) above divided by the kernel).
LAYERS = (
    ('level1_3x3x1_32to64', (16, 128, 128), 32, 64, (3, 3, 1), False),
    ('level2_3x3x1_64to128', (16, 64, 64), 64, 128, (3, 3, 1), False),
    ('level3_3x3x3_128to256', (16, 32, 32), 128, 256, (3, 3, 3), False),
    ('bottleneck_3x3x3_256to512', (8, 16, 16), 256, 512, (3, 3, 3), False),
    ('decoder3_3x3x3_384to128', (16, 32, 32), 384, 128, (3, 3, 3), False),
    ('decoder1_3x3x1_96to32', (16, 128, 128), 96, 32, (3, 3, 1), False),
    ('upconv3_2x2x2_512to128', (16, 32, 32), 512, 128, (2, 2, 2), True),
    ('upconv1_2x2x1_64to32', (16, 128, 128), 64, 32, (2, 2, 1), True),
)


def _fold2d_xla(x, kernel):
  """fold2d with XLA's own convolution gradient (no custom VJP)."""
  kx, ky, kz, cin, cout = kernel.shape
  b, z, h, w, _ = x.shape
  y = lax.conv_general_dilated(convs.fold_depth(x, kz).reshape(b * z, h, w, kz * cin),
                               kernel.reshape(kx, ky, kz * cin, cout), (1, 1), 'SAME',
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape(b, z, h, w, cout)


IMPLS = {
    'native': functools.partial(convs.conv3d, impl='native'),
    'fold2d_xla': _fold2d_xla,
    'fold2d': functools.partial(convs.conv3d, impl='fold2d'),
    'winograd': functools.partial(convs.conv3d, impl='winograd'),
}


def _up(conv):
  """Nearest upsampling by the kernel's size, then ``conv``."""
  return lambda x, k: conv(models.upsample(x, k.shape[:3], 'nearest'), k)


UP_IMPLS = {name: _up(conv) for name, conv in IMPLS.items() if name != 'winograd'}
UP_IMPLS['winograd'] = convs.upconv_nearest


def _time(fn, *args) -> list[float]:
  jax.block_until_ready(fn(*args))  # compile
  out = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return out


def _line(seconds, gflop=None, pass_='forward', **kw):
  med = statistics.median(seconds)
  out = {**kw, 'pass': pass_, 'seconds_median': round(med, 4),
         'seconds_min': round(min(seconds), 4), 'seconds_max': round(max(seconds), 4)}
  if gflop:
    out['gflop_per_s'] = round(gflop / med, 1)
  print(json.dumps(out), flush=True)


def main(_):
  if FLAGS.keep_freed_memory:
    host_memory.keep_freed_memory()
  key = jax.random.PRNGKey(0)
  for name, (z, h, w), cin, cout, k, up in LAYERS:
    shape = (z // k[2], h // k[0], w // k[1]) if up else (z, h, w)
    x = jax.random.normal(key, (FLAGS.batch, *shape, cin), jnp.float32)
    kernel = jax.random.normal(key, (*k, cin, cout), jnp.float32) * 0.05
    flop = 2.0 * FLAGS.batch * z * h * w * cin * cout * k[0] * k[1] * k[2]
    for impl, conv in (UP_IMPLS if up else IMPLS).items():
      if impl not in FLAGS.impls:
        continue
      fwd = jax.jit(conv)
      grad = jax.jit(jax.grad(lambda x_, k_, c=conv: jnp.sum(c(x_, k_) ** 2), (0, 1)))
      for what, fn, f in (('forward', fwd, flop), ('gradient', grad, 2 * flop)):
        _line(bench='conv_layers', layer=name, impl=impl, pass_=what,
              batch=FLAGS.batch, seconds=_time(fn, x, kernel), gflop=f / 1e9)
  # Pooling and upsampling at level 1 (both 2-D on the folded layout).
  x = jax.random.normal(key, (FLAGS.batch, 16, 128, 128, 32), jnp.float32)
  for name, fn, arg in (
      ('maxpool_2x2x1_level1', lambda v: models.max_pool(v, (2, 2, 1)), x),
      ('upsample_2x2x1_nearest_level2',
       lambda v: models.upsample(v, (2, 2, 1), 'nearest'), x[:, :, :64, :64])):
    _line(bench='conv_layers', layer=name, impl='models', pass_='forward',
          batch=FLAGS.batch, seconds=_time(jax.jit(fn), arg))
    _line(bench='conv_layers', layer=name, impl='models', pass_='gradient',
          batch=FLAGS.batch, seconds=_time(
              jax.jit(jax.grad(lambda v, f=fn: jnp.sum(f(v) ** 2))), arg))


if __name__ == '__main__':
  app.run(main)
