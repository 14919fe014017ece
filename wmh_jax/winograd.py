"""Winograd minimal filtering for 'SAME' 3x3 convolutions (Lavin & Gray, CVPR 2016).

F(m x m, 3 x 3) computes each m x m output tile from an (m+2) x (m+2) input tile
with (m+2)^2 multiplications per channel pair instead of 9 m^2: F(2x2, 3x3) does
2.25x fewer, F(4x4, 3x3) 4x fewer. The work left is (m+2)^2 batched matmuls
``(tiles, Cin) @ (Cin, Cout)`` plus input and output transforms made of adds, so
XLA:CPU runs it on its matmul, its fastest kernel. Both autodiff modes work (a
custom JVP, see :func:`conv2d_winograd`); in reverse mode the input gradient is
another Winograd convolution and the kernel gradient one more batched matmul
contracting over the tiles, all with the same saving.

Rounding differs from a direct convolution: float32 outputs agree to ~1e-6 of their
largest value with F(2x2, 3x3) and ~1e-5 with F(4x4, 3x3) (measured in
tests/winograd_test.py), the usual cost of the method. float64 is computed in
float64; bfloat16 and float16 are cast to float32 once, transformed, multiplied
and accumulated there, and rounded back once, so they round like a direct
convolution.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

# (B^T, G, A^T) for F(m x m, 3 x 3), keyed by m. F(4, 3) interpolates at 0, +-1, +-2
# and infinity (Lavin & Gray, section 4.2).
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}


def tile_size(h: int, w: int, dtype) -> int | None:
  """The output tile m to use for an ``h x w`` image, or None (no Winograd).

  F(4x4, 3x3) when both sides divide by 4 in float32 or float64; F(2x2, 3x3) when
  they divide by 2 (and always in lower precisions, as the seed chose; they now
  compute in float32, where F(4, 3) would be as accurate, but it is not timed).
  """
  if (jnp.dtype(dtype) in (jnp.float32, jnp.float64) and h % 4 == 0
      and w % 4 == 0):
    return 4
  if h % 2 == 0 and w % 2 == 0:
    return 2
  return None


def _combine(coefficients, parts):
  """``sum_k coefficients[k] * parts[k]``, skipping zeros (one fused XLA loop)."""
  out = None
  for c, p in zip(coefficients, parts):
    if c == 0:
      continue
    term = p if c == 1 else -p if c == -1 else float(c) * p
    out = term if out is None else out + term
  return out


def _input_transform(x: jax.Array, m: int) -> jax.Array:
  """``(N, H, W, C)`` -> ``(a*a, N*(H/m)*(W/m), C)``: B^T d B of every input tile."""
  bt = TRANSFORMS[m][0]
  a = m + 2
  n, h, w, c = x.shape
  th, tw = h // m, w // m
  # Tile (i, j) reads xp[m*i : m*i + a, m*j : m*j + a]; 'SAME' pads one each side.
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [xp[:, k:k + m * th:m] for k in range(a)]               # (n, th, w+2, c)
  v = jnp.stack([_combine(bt[r], rows) for r in range(a)])        # (a, n, th, w+2, c)
  cols = [v[..., k:k + m * tw:m, :] for k in range(a)]            # (a, n, th, tw, c)
  v = jnp.stack([_combine(bt[r], cols) for r in range(a)], axis=1)
  return v.reshape(a * a, n * th * tw, c)


def _kernel_transform(kernel: jax.Array, m: int) -> jax.Array:
  """``(3, 3, Cin, Cout)`` -> ``(a*a, Cin, Cout)``: G g G^T, in ``kernel``'s dtype."""
  g = TRANSFORMS[m][1].astype(kernel.dtype)
  a = m + 2
  u = jnp.einsum('ij,jkco,lk->ilco', g, kernel, g,
                 preferred_element_type=kernel.dtype)
  return u.reshape(a * a, *kernel.shape[2:])


def _output_transform(prod: jax.Array, n: int, h: int, w: int, m: int) -> jax.Array:
  """``(a*a, T, C)`` -> ``(N, H, W, C)``: A^T M A of every tile, tiles in place."""
  at = TRANSFORMS[m][2]
  a = m + 2
  prod = prod.reshape(a, a, n, h // m, w // m, -1)
  y = jnp.stack([_combine(at[r], list(prod)) for r in range(m)], axis=3)
  y = jnp.stack([_combine(at[r], list(y)) for r in range(m)], axis=4)
  return y.reshape(n, h, w, -1)                                   # (n, th, m, tw, m)


def _output_transform_transposed(dy: jax.Array, m: int) -> jax.Array:
  """The adjoint of :func:`_output_transform`: ``(N, H, W, C)`` -> ``(a*a, T, C)``."""
  at = TRANSFORMS[m][2]
  a = m + 2
  n, h, w, c = dy.shape
  dy = dy.reshape(n, h // m, m, w // m, m, c)
  rows = [dy[:, :, r] for r in range(m)]                          # (n, th, tw, m, c)
  d = jnp.stack([_combine(at[:, i], rows) for i in range(a)])     # (a, n, th, tw, m, c)
  cols = [d[..., s, :] for s in range(m)]                         # (a, n, th, tw, c)
  d = jnp.stack([_combine(at[:, l], cols) for l in range(a)], axis=1)
  return d.reshape(a * a, -1, c)


def compute_dtype(dtype) -> jnp.dtype:
  """float64 stays float64; float32 and below compute in float32.

  bfloat16 and float16 hold ~3 significant digits: rounding the transformed tiles
  and kernels, and accumulating the products, in them would add several times
  the error of a direct convolution (which XLA:CPU accumulates in float32).
  """
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _check(x, kernel, m):
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'Winograd F(m, 3) needs a 3x3 kernel, got {kernel.shape[:2]}')
  if x.shape[1] % m or x.shape[2] % m:
    raise ValueError(f'image {x.shape[1]}x{x.shape[2]} does not divide into {m}x{m} '
                     'tiles')


def _products(x, kernel, m):
  """``(a*a, T, Cout)``: the tiles times the transformed kernel, in compute dtype."""
  dtype = compute_dtype(jnp.result_type(x, kernel))
  v = _input_transform(x.astype(dtype), m)
  u = _kernel_transform(kernel.astype(dtype), m)
  return lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))),
                         preferred_element_type=dtype)


def _conv(x, kernel, m):
  """The convolution, every step in :func:`compute_dtype`, rounded once at the end."""
  n, h, w, _ = x.shape
  return _output_transform(_products(x, kernel, m), n, h, w, m).astype(
      jnp.result_type(x, kernel))


def _transpose_of(f, shape, dtype):
  """The transpose of the linear ``f``, whose input is ``(shape, dtype)``."""
  return lambda y: jax.linear_transpose(f, jax.ShapeDtypeStruct(shape, dtype))(y)[0]


# The tangent terms below are written as transposes of the maps reverse mode needs
# (the input gradient's Winograd convolution, the output transform's adjoint):
# reverse mode transposes them back into those maps. Left to JAX, the transpose
# of the forward's tile reads and unstacking is a chain of pads and adds that
# ran the layer gradient 1.6x slower.

def _tangent_of_input(dx, kernel, m):
  """``conv(dx, kernel)``, as the transpose of the Winograd convolution with the
  kernel turned 180 degrees (in and out channels swapped)."""
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  return _transpose_of(lambda g: _conv(g, flipped, m),
                       (*dx.shape[:3], kernel.shape[3]), dx.dtype)(dx)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _tangent_of_kernel(x, dk, m):
  """``conv(x, dk)``; its transpose is the kernel gradient G^T (V^T dM) G.

  Rematerialised: reverse mode keeps ``x``, not its tiles (2.25-4x larger), and
  recomputes them for the kernel gradient.
  """
  n, h, w, _ = x.shape
  prod = _products(x, dk, m)
  dtype = jnp.result_type(x, dk)
  out = _transpose_of(lambda y: _output_transform_transposed(y, m),
                      (n, h, w, prod.shape[-1]), prod.dtype)(prod)
  return out.astype(dtype)


def _is_zero(t) -> bool:
  return isinstance(t, jax.custom_derivatives.SymbolicZero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d_winograd(x: jax.Array, kernel: jax.Array, m: int) -> jax.Array:
  """'SAME' 2-D cross-correlation by F(m x m, 3 x 3).

  Args:
    x: ``(N, H, W, Cin)`` with H and W divisible by m.
    kernel: ``(3, 3, Cin, Cout)`` (HWIO).
    m: 2 or 4, the output tile (see :func:`tile_size`).

  Returns:
    ``(N, H, W, Cout)`` in the inputs' dtype, equal to
    ``lax.conv_general_dilated(..., 'SAME')`` up to rounding.

  Differentiable in both modes (a custom JVP). Convolution is bilinear, so the
  tangent is ``conv(dx, k) + conv(x, dk)``, two more Winograd convolutions, and
  reverse mode is the transpose of that linear map: the input gradient is the
  same Winograd convolution of the output gradient with the kernel turned 180
  degrees, the kernel gradient G^T (V^T dM) G, with V the input tiles
  (recomputed, not stored) and dM the output transform's adjoint applied to the
  output gradient, one more batched matmul contracting over the tiles.
  """
  _check(x, kernel, m)
  return _conv(x, kernel, m)


@functools.partial(conv2d_winograd.defjvp, symbolic_zeros=True)
def _conv2d_same_jvp(m, primals, tangents):
  x, kernel = primals
  dx, dk = tangents
  y = conv2d_winograd(x, kernel, m)
  terms = ([] if _is_zero(dx) else [_tangent_of_input(dx, kernel, m)]) + (
      [] if _is_zero(dk) else [_tangent_of_kernel(x, dk, m)])
  dy = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, dy.astype(y.dtype)
