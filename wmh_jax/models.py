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
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmh_jax import convs

class Conv3D(nn.Module):
  """3-D convolution whose parameters do not depend on the implementation.

  With ``upsample_first`` (the up-convolution of the decoder) the input is first
  upsampled by nearest neighbour (``conv.upconv``).
  """
  features: int
  kernel_size: Sequence[int]  # (kx, ky, kz)
  conv: convs.ConvImpl = convs.IMPLS['winograd']
  dtype: Any = jnp.float32
  bias_init: Any = nn.initializers.zeros
  upsample_first: Sequence[int] | None = None  # (px, py, pz)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', convs.KERNEL_INIT,
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.upsample_first is None:
      return self.conv.conv(x, kernel) + bias
    return self.conv.upconv(x, kernel, self.upsample_first) + bias


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
    return convs.upsample_nearest(x, pool)
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
  conv: convs.ConvImpl = convs.IMPLS['winograd']
  dtype: Any = jnp.float32
  upsample_first: Sequence[int] | None = None  # for the first convolution

  @nn.compact
  def __call__(self, x, train: bool):
    for i, f in enumerate(self.features):
      x = Conv3D(f, self.kernel_size, self.conv, self.dtype,
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
  conv: convs.ConvImpl = convs.IMPLS['winograd']  # see create_model
  output_bias: float = 0.0
  brain_output: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = dict(norm=self.norm, conv=self.conv, dtype=self.dtype)
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
    x = Conv3D(self.num_outputs, (1, 1, 1), self.conv, self.dtype,
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
      conv=convs.get(model_config.conv_impl, norm=model_config.norm),
      output_bias=model_config.output_bias,
      brain_output=model_config.get('brain_output', False),
      dtype=jnp.dtype(model_config.dtype),
  )
