"""The 3-D U-Net of the seed study, in Flax linen.

After Çiçek et al., "3D U-Net: Learning Dense Volumetric Segmentation from Sparse
Annotation", MICCAI 2016, as adapted by the 2017 WMH study: anisotropic (3, 3, 1)
kernels in the upper levels, no normalisation, a 1x1x1 convolution to one logit.

Volumes enter as ``(batch, X, Y, Z, channels)`` (Z = slices) and logits leave with
the same spatial shape and one channel. Internally the network works in the layout
``(batch, Z, X, Y, channels)`` so that a ``(kx, ky, 1)`` convolution is a 2-D
convolution over ``batch * Z`` images (see :class:`Conv3D`).
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from wmh_jax import winograd

# He initialisation: the network is all ReLU.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
CONV_IMPLS = ('native', 'fold2d', 'winograd', 'auto')
# Fewer folded input channels than this go to the direct 2-D convolution under
# 'winograd': the transforms would cost more than the matmuls they shrink.
WINOGRAD_MIN_CHANNELS = 8


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """Maps 'auto' to the fastest implementation on ``backend``.

  XLA:CPU runs 2-D convolutions far faster than 3-D ones, and Winograd's 3x3
  convolutions as matmuls faster still (see bench/conv_layers.py); cuDNN and the
  TPU compiler do 3-D convolutions well, so 'auto' keeps them native there.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  backend = backend or jax.default_backend()
  return 'winograd' if backend == 'cpu' else 'native'


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
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
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


@functools.partial(conv2d_same.defjvp, symbolic_zeros=True)
def _conv2d_same_jvp(primals, tangents):
  x, kernel = primals
  dx, dk = tangents
  y = conv2d_same(x, kernel)
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
    y = winograd.conv2d_same(x.reshape(b * z, h, w, kz * cin),
                             kernel.reshape(kx, ky, kz * cin, cout), m)
  else:
    y = conv2d_same(x.reshape(b * z, h, w, kz * cin),
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


class Conv3D(nn.Module):
  """3-D convolution whose parameters do not depend on the implementation.

  With ``upsample_first`` (the up-convolution of the decoder) the input is first
  upsampled by nearest neighbour; under 'winograd', when the kernel has the
  upsampling's size, both happen at once in :func:`upconv_nearest`.
  """
  features: int
  kernel_size: Sequence[int]  # (kx, ky, kz)
  impl: str = 'winograd'
  dtype: Any = jnp.float32
  bias_init: Any = nn.initializers.zeros
  upsample_first: Sequence[int] | None = None  # (px, py, pz)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _KERNEL_INIT,
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    up = self.upsample_first
    if up is None:
      return conv3d(x, kernel, self.impl) + bias
    if (self.impl == 'winograd' and tuple(up) == tuple(self.kernel_size)
        and set(up) <= {1, 2}):
      return upconv_nearest(x, kernel) + bias
    return conv3d(upsample(x, up, 'nearest'), kernel, self.impl) + bias


def max_pool(x: jax.Array, pool: Sequence[int]) -> jax.Array:
  """Non-overlapping max pooling of ``(B, Z, X, Y, C)`` by ``pool = (px, py, pz)``."""
  px, py, pz = pool
  b, z, h, w, c = x.shape
  return x.reshape(b, z // pz, pz, h // px, px, w // py, py, c).max(axis=(2, 4, 6))


def upsample(x: jax.Array, pool: Sequence[int], mode: str) -> jax.Array:
  """Inverse of :func:`max_pool`'s geometry: nearest or (tri)linear."""
  px, py, pz = pool
  b, z, h, w, c = x.shape
  if mode == 'nearest':
    x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :],
                         (b, z, pz, h, px, w, py, c))
    return x.reshape(b, z * pz, h * px, w * py, c)
  if mode == 'linear':
    return jax.image.resize(x, (b, z * pz, h * px, w * py, c), 'linear')
  raise ValueError(f'upsampling must be nearest or linear, got {mode!r}')


def _norm(kind: str, features: int, dtype) -> nn.Module | None:
  if kind == 'none':
    return None
  if kind == 'group':  # 8 groups (fewer when the channels do not divide by 8)
    return nn.GroupNorm(num_groups=math.gcd(8, features), dtype=dtype)
  if kind == 'instance':
    return nn.GroupNorm(num_groups=None, group_size=1, dtype=dtype)
  if kind == 'batch':
    return nn.BatchNorm(momentum=0.9, dtype=dtype)
  raise ValueError(f'norm must be none, batch, group or instance, got {kind!r}')


class ConvBlock(nn.Module):
  """Convolutions, each followed by the optional norm and a ReLU.

  Each post-activation map is sown into the ``intermediates`` collection as
  ``relu{i}`` (a no-op unless ``apply`` is called with it mutable): the
  activation collage of predict reads them.
  """
  features: Sequence[int]
  kernel_size: Sequence[int]
  norm: str = 'none'
  impl: str = 'winograd'
  dtype: Any = jnp.float32
  upsample_first: Sequence[int] | None = None  # for the first convolution

  @nn.compact
  def __call__(self, x, train: bool):
    for i, f in enumerate(self.features):
      x = Conv3D(f, self.kernel_size, self.impl, self.dtype,
                 upsample_first=self.upsample_first if i == 0 else None)(x)
      norm = _norm(self.norm, f, self.dtype)
      if norm is not None:
        x = norm(x, use_running_average=not train) if self.norm == 'batch' else norm(x)
      x = nn.relu(x)
      self.sow('intermediates', f'relu{i}', x)
    return x


class UNet3D(nn.Module):
  """3-D U-Net with per-level filters, kernels and pooling.

  Level ``i`` of the encoder applies ``len(encoder_filters[i])`` convolutions with
  ``kernel_sizes[i]``, keeps the result as a skip connection, and max-pools by
  ``pool_sizes[i]``. The bottleneck applies ``bottleneck_filters`` with
  ``bottleneck_kernel``. Decoder level ``i`` (deepest first) upsamples by
  ``pool_sizes[i]``, applies one convolution of ``decoder_filters[i]`` with a
  ``pool_sizes[i]`` kernel (the "up-convolution"), concatenates the skip, and applies
  two more convolutions with ``kernel_sizes[i]``. A 1x1x1 convolution gives one
  logit per voxel (apply a sigmoid for the lesion probability); with
  ``brain_output`` two: channel 0 the lesion logit (initial bias ``output_bias``),
  channel 1 the brain logit (initial bias 0).

  Input: ``(B, X, Y, Z, C)`` with X, Y, Z divisible by the product of the pool
  sizes. Output: ``(B, X, Y, Z, 1)`` logits (``(B, X, Y, Z, 2)`` with
  ``brain_output``), float32.
  """
  encoder_filters: Sequence[Sequence[int]] = ((32, 64), (64, 128), (128, 256))
  kernel_sizes: Sequence[Sequence[int]] = ((3, 3, 1), (3, 3, 1), (3, 3, 3))
  pool_sizes: Sequence[Sequence[int]] = ((2, 2, 1), (2, 2, 1), (2, 2, 2))
  bottleneck_filters: Sequence[int] = (256, 512)
  bottleneck_kernel: Sequence[int] = (3, 3, 3)
  decoder_filters: Sequence[int] = (32, 64, 128)
  norm: str = 'none'
  upsampling: str = 'nearest'
  conv_impl: str = 'auto'
  output_bias: float = 0.0
  brain_output: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    impl = resolve_conv_impl(self.conv_impl)
    block = dict(norm=self.norm, impl=impl, dtype=self.dtype)
    x = jnp.transpose(x, (0, 3, 1, 2, 4))  # (B, X, Y, Z, C) -> (B, Z, X, Y, C)
    skips = []
    for filters, kernel, pool in zip(self.encoder_filters, self.kernel_sizes,
                                     self.pool_sizes):
      x = ConvBlock(filters, kernel, **block)(x, train)
      skips.append(x)
      x = max_pool(x, pool)
    x = ConvBlock(self.bottleneck_filters, self.bottleneck_kernel, **block)(x, train)
    for level in reversed(range(len(skips))):
      pool, f = self.pool_sizes[level], self.decoder_filters[level]
      if self.upsampling == 'nearest':  # inside the convolution: see Conv3D
        x = ConvBlock((f,), pool, upsample_first=pool, **block)(x, train)
      else:
        x = ConvBlock((f,), pool, **block)(upsample(x, pool, self.upsampling), train)
      x = jnp.concatenate([x, skips[level].astype(x.dtype)], axis=-1)
      x = ConvBlock((f, f), self.kernel_sizes[level], **block)(x, train)
    x = Conv3D(self.num_outputs, (1, 1, 1), impl, self.dtype,
               _output_bias_init((self.output_bias, 0.0)[:self.num_outputs]))(x)
    return jnp.transpose(x, (0, 2, 3, 1, 4)).astype(jnp.float32)  # -> (B,X,Y,Z,C)

  @property
  def num_outputs(self) -> int:
    """Output channels: the lesion logit, and the brain logit with brain_output."""
    return 2 if self.brain_output else 1


def _output_bias_init(values):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(values, dtype).reshape(shape)
  return init


def output_bias(params) -> jax.Array:
  """The output convolution's bias, one value per output channel."""
  return params['Conv3D_0']['bias']


def create_model(model_config) -> UNet3D:
  """Builds the U-Net from a ``config.model`` ConfigDict."""
  to_tuple = lambda seq: tuple(tuple(s) for s in seq)
  return UNet3D(
      encoder_filters=to_tuple(model_config.encoder_filters),
      kernel_sizes=to_tuple(model_config.kernel_sizes),
      pool_sizes=to_tuple(model_config.pool_sizes),
      bottleneck_filters=tuple(model_config.bottleneck_filters),
      bottleneck_kernel=tuple(model_config.bottleneck_kernel),
      decoder_filters=tuple(model_config.decoder_filters),
      norm=model_config.norm,
      upsampling=model_config.upsampling,
      conv_impl=model_config.conv_impl,
      output_bias=model_config.output_bias,
      brain_output=model_config.get('brain_output', False),
      dtype=jnp.dtype(model_config.dtype),
  )
