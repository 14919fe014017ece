"""3-D convolutions of the U-Net: one table from a config name to an implementation.

Every implementation computes the same 'SAME', stride-1 cross-correlation on
``(B, Z, X, Y, C)`` with a ``(kx, ky, kz, Cin, Cout)`` kernel, up to rounding:

- ``native``: one ``lax`` 3-D convolution (fast on GPU and TPU).
- ``fold2d``: the slices folded into the batch, a ``kz > 1`` kernel folded into
  channels (:func:`fold_depth`), then 2-D convolutions whose kernel gradient is one
  im2col matmul (:func:`conv2d_im2col_grad`).
- ``winograd``: ``fold2d`` with its 3x3 convolutions by :mod:`wmh_jax.winograd`,
  and the decoder's nearest up-convolution at low resolution (:func:`upconv_nearest`).

To add one: write ``conv(x, kernel)`` and ``upconv(x, kernel, up)`` and add a
:class:`ConvImpl` to :data:`IMPLS`. ``'auto'`` is resolved once, by :func:`get`.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from wmh_jax import winograd

# He initialisation: the network is all ReLU.
KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
NAMES = ('native', 'fold2d', 'winograd', 'auto')
# Fewer folded input channels than this go to the direct 2-D convolution under
# 'winograd': the transforms would cost more than the matmuls they shrink.
WINOGRAD_MIN_CHANNELS = 8


def resolve_name(impl: str, backend: str | None = None, norm: str = 'none') -> str:
  """Maps 'auto' to the fastest safe implementation on ``backend``.

  XLA:CPU runs 2-D convolutions far faster than 3-D ones, and Winograd's 3x3
  convolutions as matmuls faster still (see bench/conv_layers.py); cuDNN and the
  TPU compiler do 3-D convolutions well, so 'auto' keeps them native there. With
  a norm layer 'auto' is native too: see :data:`JIT_NORM_BUG`.
  """
  if impl not in NAMES:
    raise ValueError(f'conv_impl must be one of {NAMES}, got {impl!r}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  return 'winograd' if backend == 'cpu' and norm == 'none' else 'native'


def _conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches2d(x: jax.Array, kx: int, ky: int) -> jax.Array:
  """im2col for a 'SAME' (kx, ky) convolution: ``(N*H*W, kx*ky*C)``."""
  n, h, w, c = x.shape
  lx, ly = (kx - 1) // 2, (ky - 1) // 2
  xp = jnp.pad(x, ((0, 0), (lx, kx - 1 - lx), (ly, ky - 1 - ly), (0, 0)))
  cols = [xp[:, i:i + h, j:j + w] for i in range(kx) for j in range(ky)]
  return jnp.concatenate(cols, axis=-1).reshape(n * h * w, kx * ky * c)


@jax.custom_jvp
def conv2d_im2col_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' 2-D convolution (NHWC, HWIO) with a faster kernel gradient on CPU.

  XLA:CPU computes the kernel gradient of a 2-D convolution 3-6x slower than the
  forward pass (measured in bench/conv_layers.py); as one im2col matmul it is 2-3x
  faster than that. A custom JVP (so forward mode works too): the kernel's
  tangent term is written as that matmul, ``patches(x) @ dk``, whose transpose
  is the im2col kernel gradient; the input's stays XLA's own convolution.
  """
  return _conv2d(x, kernel)


@jax.checkpoint  # reverse mode keeps x, not its kx*ky times larger patches
def _conv2d_by_patches(x, kernel):
  kx, ky, cin, cout = kernel.shape
  y = _patches2d(x, kx, ky) @ kernel.reshape(kx * ky * cin, cout)
  return y.reshape(*x.shape[:3], cout)


@functools.partial(conv2d_im2col_grad.defjvp, symbolic_zeros=True)
def _conv2d_same_jvp(primals, tangents):
  x, kernel = primals
  dx, dk = tangents
  y = conv2d_im2col_grad(x, kernel)
  zero = lambda t: isinstance(t, jax.custom_derivatives.SymbolicZero)
  terms = ([] if zero(dx) else [_conv2d(dx, kernel)]) + (
      [] if zero(dk) else [_conv2d_by_patches(x, dk)])
  return y, (functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y))


def fold_depth(x: jax.Array, kz: int) -> jax.Array:
  """``(B, Z, X, Y, C) -> (B, Z, X, Y, kz * C)``: the kz depth-shifted copies of
  ``x`` ('SAME' zero padding) stacked along channels, so that a (kx, ky, kz)
  kernel becomes a (kx, ky) one over kz * C channels."""
  if kz == 1:
    return x
  z = x.shape[1]
  lo = (kz - 1) // 2  # the padding lax uses for 'SAME'
  xp = jnp.pad(x, ((0, 0), (lo, kz - 1 - lo), (0, 0), (0, 0), (0, 0)))
  return jnp.concatenate([xp[:, d:d + z] for d in range(kz)], axis=-1)


def conv3d(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """'SAME' 3-D cross-correlation, stride 1.

  Args:
    x: ``(B, Z, X, Y, Cin)``.
    kernel: ``(kx, ky, kz, Cin, Cout)``.
    impl: 'native' (one 3-D convolution), 'fold2d' (slices folded into the batch;
      a kernel with kz > 1 becomes one 2-D convolution over the kz depth-shifted
      copies of the input stacked along channels) or 'winograd' (fold2d, with the
      3x3 2-D convolutions computed by :mod:`wmh_jax.winograd`). All give the same
      result up to rounding.

  Returns:
    ``(B, Z, X, Y, Cout)``.
  """
  kx, ky, kz, cin, cout = kernel.shape
  if impl == 'native':
    return lax.conv_general_dilated(
        x, jnp.transpose(kernel, (2, 0, 1, 3, 4)), (1, 1, 1), 'SAME',
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  if impl not in ('fold2d', 'winograd'):
    raise ValueError(f'unknown conv impl {impl!r}')
  b, z, h, w, _ = x.shape
  x = fold_depth(x, kz)
  m = winograd.tile_size(h, w, x.dtype) if impl == 'winograd' else None
  if kx == ky == 1:
    y = x.reshape(-1, kz * cin) @ kernel.reshape(kz * cin, cout)
  elif kx == ky == 3 and m is not None and kz * cin >= WINOGRAD_MIN_CHANNELS:
    y = winograd.conv2d_winograd(x.reshape(b * z, h, w, kz * cin),
                             kernel.reshape(kx, ky, kz * cin, cout), m)
  else:
    y = conv2d_im2col_grad(x.reshape(b * z, h, w, kz * cin),
                    kernel.reshape(kx, ky, kz * cin, cout))
  return y.reshape(b, z, h, w, cout)


def _shift_up(x: jax.Array, axis: int) -> jax.Array:
  """``x[i + 1]`` along ``axis``, zero past the end."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, 1)
  return lax.slice_in_dim(jnp.pad(x, pad), 1, x.shape[axis] + 1, axis=axis)


def upconv_nearest(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Nearest upsampling by the kernel's size, then a 'SAME' convolution with it,
  computed at the low resolution (sub-pixel convolution).

  Along an axis upsampled by 2 with kernel taps (k0, k1), 'SAME' pads one voxel
  after, so output 2i is (k0 + k1) x[i] and output 2i + 1 is k0 x[i] + k1 x[i + 1]:
  each of the 2^d output parities is a small matmul over shifted copies of the
  low-resolution input. It does 9/16 of the multiply-adds of a (2, 2, 1) kernel
  on the upsampled grid and 27/64 of a (2, 2, 2) one, and never builds the
  upsampled input.

  Args:
    x: ``(B, Z, X, Y, Cin)`` before upsampling.
    kernel: ``(px, py, pz, Cin, Cout)``, each of px, py, pz 1 or 2.

  Returns:
    ``(B, pz Z, px X, py Y, Cout)``.
  """
  px, py, pz, cin, cout = kernel.shape
  if not {px, py, pz} <= {1, 2}:
    raise ValueError(f'sub-pixel up-convolution needs kernel sides 1 or 2, got '
                     f'{(px, py, pz)}')
  b, z, h, w, _ = x.shape
  # (x axis, kernel axis, factor) for Z, X, Y.
  axes = ((1, 2, pz), (2, 0, px), (3, 1, py))
  # Per axis and parity: the taps as (offset, kernel indices summed).
  taps = lambda p, a: [(0, (0,))] if p == 1 else (
      [(0, (0, 1))] if a == 0 else [(0, (0,)), (1, (1,))])
  shifted = {}

  def shift(offsets):
    if offsets not in shifted:
      y = x
      for (axis, _, _), o in zip(axes, offsets):
        y = _shift_up(y, axis) if o else y
      shifted[offsets] = y
    return shifted[offsets]

  parities = []
  for az in range(pz):
    for ax in range(px):
      for ay in range(py):
        inputs, weights = [], []
        for tz in taps(pz, az):
          for tx in taps(px, ax):
            for ty in taps(py, ay):
              inputs.append(shift((tz[0], tx[0], ty[0])))
              wk = kernel
              for axis, idx in ((0, tx[1]), (1, ty[1]), (2, tz[1])):
                wk = lax.slice_in_dim(wk, idx[0], idx[-1] + 1, axis=axis)
              weights.append(wk.sum(axis=(0, 1, 2)))
        k = len(inputs)
        y = (jnp.concatenate(inputs, axis=-1).reshape(-1, k * cin)
             @ jnp.concatenate(weights, axis=0))
        parities.append(y.reshape(b, z, h, w, cout))
  y = jnp.stack(parities).reshape(pz, px, py, b, z, h, w, cout)
  y = jnp.transpose(y, (3, 4, 0, 5, 1, 6, 2, 7))  # (B, Z, pz, X, px, Y, py, C)
  return y.reshape(b, z * pz, h * px, w * py, cout)


def upsample_nearest(x: jax.Array, pool: Sequence[int]) -> jax.Array:
  """Nearest upsampling of ``(B, Z, X, Y, C)`` by ``pool = (px, py, pz)``."""
  px, py, pz = pool
  b, z, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :],
                       (b, z, pz, h, px, w, py, c))
  return x.reshape(b, z * pz, h * px, w * py, c)


@dataclasses.dataclass(frozen=True)
class ConvImpl:
  """One implementation: ``conv(x, kernel)``, and ``upconv(x, kernel, up)`` (nearest
  upsampling by ``up`` then ``conv``)."""
  name: str
  conv: Callable[[jax.Array, jax.Array], jax.Array]
  upconv: Callable[[jax.Array, jax.Array, Sequence[int]], jax.Array]


def _upsample_then(impl: str):
  return lambda x, kernel, up: conv3d(upsample_nearest(x, up), kernel, impl)


def _winograd_upconv(x, kernel, up):
  if tuple(up) == tuple(kernel.shape[:3]) and set(up) <= {1, 2}:
    return upconv_nearest(x, kernel)
  return _upsample_then('winograd')(x, kernel, up)


IMPLS = {name: ConvImpl(name, functools.partial(conv3d, impl=name),
                        _winograd_upconv if name == 'winograd' else _upsample_then(name))
         for name in ('native', 'fold2d', 'winograd')}


# jaxlib 0.10.2, XLA:CPU: under jax.jit, with group norm after it, the kernel
# gradient of conv2d_im2col_grad (fold2d; winograd below 8 channels) is wrong for
# the last channel of each group; right eagerly, with lax's convolution in its
# place, with XLA's fusion passes off, and with instance norm; still wrong
# without the jax.checkpoint. Batch norm is not checked, so 'auto' avoids every
# norm. tests/models_test.py keeps it as a strict xfail.
JIT_NORM_BUG = ('group',)


def get(name: str, backend: str | None = None, norm: str = 'none') -> ConvImpl:
  """The implementation named ``name`` ('auto' resolved for ``backend`` and
  ``norm``); warns in one line when the pair is one of :data:`JIT_NORM_BUG`'s."""
  impl = resolve_name(name, backend, norm)
  if impl != 'native' and norm in JIT_NORM_BUG:
    warnings.warn(f'conv_impl {impl!r} with norm {norm!r}: XLA:CPU miscompiles its '
                  'kernel gradient under jit; use conv_impl native or auto',
                  stacklevel=2)
  return IMPLS[impl]
