import jax
import jax.numpy as jnp
from jax import lax
from jax import test_util as jtu
import numpy as np
import pytest

from wmh_jax import convs
from wmh_jax import winograd


def _direct(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# Measured bounds: F(2x2, 3x3) rounds like a direct convolution, F(4x4, 3x3)
# ~10x worse (its transforms hold 4, 5 and 8).
@pytest.mark.parametrize('m,tol', [(2, 2e-6), (4, 2e-5)])
def test_matches_direct_convolution_forward_and_gradients(m, tol):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 12, 40))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 40, 24)) / np.sqrt(360)
  y = winograd.conv2d_winograd(x, k, m)
  assert y.shape == (3, 8, 12, 24)
  assert _relative_error(y, _direct(x, k)) < tol
  dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  gx, gk = jax.vjp(lambda a, b: winograd.conv2d_winograd(a, b, m), x, k)[1](dy)
  rx, rk = jax.vjp(_direct, x, k)[1](dy)
  assert _relative_error(gx, rx) < tol
  assert _relative_error(gk, rk) < tol


def test_a_single_pixel_gives_the_flipped_kernel_at_the_tile_borders():
  # 'SAME' edges: the impulse sits on a tile corner, so every output it reaches
  # crosses a tile border; zero padding must hold at the image border too.
  for m in (2, 4):
    for pos in [(0, 0), (3, 4), (7, 7)]:
      x = jnp.zeros((1, 8, 8, 1)).at[0, pos[0], pos[1], 0].set(1.0)
      k = jnp.arange(9.0).reshape(3, 3, 1, 1)
      np.testing.assert_allclose(winograd.conv2d_winograd(x, k, m), _direct(x, k),
                                 atol=1e-5)


def test_tile_size_rules():
  assert winograd.tile_size(128, 64, jnp.float32) == 4
  assert winograd.tile_size(6, 10, jnp.float32) == 2
  assert winograd.tile_size(8, 8, jnp.bfloat16) == 2   # F(4, 3) loses too much
  assert winograd.tile_size(7, 8, jnp.float32) is None


def test_refuses_what_it_cannot_compute():
  x = jnp.zeros((1, 8, 8, 2))
  with pytest.raises(ValueError, match='3x3'):
    winograd.conv2d_winograd(x, jnp.zeros((2, 2, 2, 1)), 2)
  with pytest.raises(ValueError, match='tiles'):
    winograd.conv2d_winograd(jnp.zeros((1, 6, 8, 2)), jnp.zeros((3, 3, 2, 1)), 4)


@pytest.mark.parametrize('shape,kz', [((2, 4, 8, 8, 16), 1), ((1, 4, 8, 12, 8), 3),
                                      ((1, 2, 6, 6, 4), 1), ((1, 2, 7, 6, 16), 1)])
def test_conv3d_winograd_matches_native_including_fallbacks(shape, kz):
  # 8x8 and 8x12: F(4, 3); 6x6 with 4 channels: direct (too few channels);
  # 7x6: direct (odd side).
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, kz, shape[-1], 5))
  assert _relative_error(convs.conv3d(x, w, 'winograd'),
                         convs.conv3d(x, w, 'native')) < 2e-5


def _bilinear_check_inputs(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 5), dtype)
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 3), dtype) / 6
  return x, k


@pytest.mark.parametrize('m', [2, 4])
def test_float64_is_computed_in_float64_and_passes_check_grads(m):
  # x64 only inside this test: the context restores the global setting.
  with jax.enable_x64(True):
    x, k = _bilinear_check_inputs(jnp.float64)
    y = winograd.conv2d_winograd(x, k, m)
    assert y.dtype == jnp.float64
    assert _relative_error(y, _direct(x, k)) < 1e-12   # float32 rounding: ~1e-7
    assert winograd.tile_size(8, 8, jnp.float64) == 4
    jtu.check_grads(lambda a, b: winograd.conv2d_winograd(a, b, m), (x, k),
                              order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('m', [2, 4])
def test_bfloat16_rounds_about_as_much_as_a_direct_convolution(m):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 12, 40)).astype(jnp.bfloat16)
  k = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 40, 24)) / np.sqrt(360)
       ).astype(jnp.bfloat16)
  with jax.enable_x64(True):  # the exact result of the bfloat16 inputs
    ref = np.asarray(_direct(jnp.asarray(np.asarray(x, np.float64)),
                             jnp.asarray(np.asarray(k, np.float64))))
  y = winograd.conv2d_winograd(x, k, m)
  assert y.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y, np.float64) - ref).max()
  direct_err = np.abs(np.asarray(_direct(x, k), np.float64) - ref).max()
  # Transforms and products kept in bfloat16 gave 3-5x the direct error.
  assert err <= 1.5 * direct_err, (err, direct_err)


@pytest.mark.parametrize('m', [2, 4])
def test_forward_mode_jacfwd_and_hessian_match_the_direct_convolution(m):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 2)) / 8
  dx = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  dk = jax.random.normal(jax.random.PRNGKey(3), k.shape)
  ours = lambda a, b: winograd.conv2d_winograd(a, b, m)
  y, dy = jax.jvp(ours, (x, k), (dx, dk))
  ry, rdy = jax.jvp(_direct, (x, k), (dx, dk))
  assert _relative_error(y, ry) < 2e-5 and _relative_error(dy, rdy) < 2e-5
  scalar = lambda conv: lambda a: jnp.sum(jnp.sin(conv(a, k)))
  assert _relative_error(jax.jacfwd(lambda a: ours(a, k))(x),
                         jax.jacfwd(lambda a: _direct(a, k))(x)) < 2e-5
  assert _relative_error(jax.hessian(scalar(ours))(x),
                         jax.hessian(scalar(_direct))(x)) < 2e-4


def test_models_im2col_convolution_supports_both_modes_in_float64():
  with jax.enable_x64(True):
    x, k = _bilinear_check_inputs(jnp.float64)
    assert _relative_error(convs.conv2d_im2col_grad(x, k), _direct(x, k)) < 1e-12
    jtu.check_grads(convs.conv2d_im2col_grad, (x, k), order=2,
                              modes=('fwd', 'rev'))
