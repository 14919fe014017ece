import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from wmh_jax import models

# Parameters of the seed network as configured in configs/default.py.
SEED_NETWORK_PARAMS = 9_286_017


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_default_network_shape_and_parameter_count():
  model = models.create_model(default.get_config().model)
  x = jnp.zeros((1, 128, 128, 16, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert _count(variables['params']) == SEED_NETWORK_PARAMS
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out.shape == (1, 128, 128, 16, 1)
  # The seed's kernels: (3,3,1) in the first two levels, (3,3,3) below.
  p = variables['params']
  assert p['ConvBlock_0']['Conv3D_0']['kernel'].shape == (3, 3, 1, 1, 32)
  assert p['ConvBlock_2']['Conv3D_1']['kernel'].shape == (3, 3, 3, 128, 256)
  assert p['ConvBlock_3']['Conv3D_1']['kernel'].shape == (3, 3, 3, 256, 512)


def _small(impl, norm='none'):
  return models.UNet3D(encoder_filters=((4, 6), (6, 8)),
                       kernel_sizes=((3, 3, 1), (3, 3, 3)),
                       pool_sizes=((2, 2, 1), (2, 2, 2)),
                       bottleneck_filters=(8, 12), bottleneck_kernel=(3, 3, 3),
                       decoder_filters=(4, 6), conv_impl=impl, norm=norm)


@pytest.mark.parametrize('impl', ['fold2d', 'winograd'])
@pytest.mark.parametrize('norm', ['none', 'group'])
def test_fold2d_and_winograd_match_native_forward_and_gradients(impl, norm):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4, 1))
  native, fold = _small('native', norm), _small(impl, norm)
  params = native.init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree.structure(params) == jax.tree.structure(
      fold.init(jax.random.PRNGKey(0), x)['params'])
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({'params': p}, x)))
  ya, yb = native.apply({'params': params}, x), fold.apply({'params': params}, x)
  np.testing.assert_allclose(ya, yb, atol=1e-5, rtol=1e-5)
  ga, gb = jax.grad(loss(native))(params), jax.grad(loss(fold))(params)
  # Group norm divides by small per-group deviations, which magnifies float32
  # summation-order differences between the two implementations.
  tol = 1e-5 if norm == 'none' else 1e-3
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize('kernel', [(3, 3, 1), (3, 3, 3), (2, 2, 2), (2, 2, 1),
                                    (1, 1, 1)])
def test_conv3d_implementations_agree(kernel):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10, 8, 3))  # (B, Z, X, Y, C)
  w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, 3, 5))
  for impl in ('fold2d', 'winograd'):
    np.testing.assert_allclose(models.conv3d(x, w, 'native'),
                               models.conv3d(x, w, impl), atol=1e-4, rtol=1e-5)


def test_auto_picks_winograd_on_cpu_and_native_on_gpu():
  assert models.resolve_conv_impl('auto', 'cpu') == 'winograd'
  assert models.resolve_conv_impl('auto', 'gpu') == 'native'
  with pytest.raises(ValueError):
    models.resolve_conv_impl('fft')


def test_pool_and_upsample_geometry():
  x = jnp.arange(2 * 4 * 6 * 8 * 1, dtype=jnp.float32).reshape(2, 4, 6, 8, 1)
  y = models.max_pool(x, (2, 2, 2))   # pool is (px, py, pz) on (B, Z, X, Y, C)
  assert y.shape == (2, 2, 3, 4, 1)
  assert float(y[0, 0, 0, 0, 0]) == float(x[0, :2, :2, :2, 0].max())
  up = models.upsample(y, (2, 2, 2), 'nearest')
  assert up.shape == x.shape
  np.testing.assert_array_equal(up[0, 1, 1, 1], y[0, 0, 0, 0])


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state():
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from wmh_jax import steps  # pylint: disable=g-import-not-at-top
  cfg = test_config.get_config()
  outputs = {}
  for dtype in ('float32', 'bfloat16'):
    cfg.model.dtype = dtype
    model = models.create_model(cfg.model)
    tx = steps.create_optimizer(cfg.train)
    state = steps.create_train_state(cfg, jax.random.PRNGKey(0), model, tx)
    x = jax.random.normal(jax.random.PRNGKey(1), steps.input_shape(cfg))
    batch = {'image': x, 'labels': (x[..., 0] > 1.5).astype(jnp.uint8)}
    new, m = jax.jit(lambda s, b, m=model, t=tx: steps.train_step(
        s, b, jax.random.PRNGKey(2), model=m, tx=t, loss_config=cfg.loss))(state, batch)
    assert {l.dtype for l in jax.tree.leaves(new.params)} == {jnp.dtype('float32')}
    assert {l.dtype for l in jax.tree.leaves(new.opt_state)
            if hasattr(l, 'dtype') and l.ndim} == {jnp.dtype('float32')}
    assert np.isfinite(float(m['loss']))
    outputs[dtype] = model.apply({'params': state.params}, x)
  assert outputs['bfloat16'].dtype == jnp.float32  # logits come back in float32
  np.testing.assert_allclose(outputs['bfloat16'], outputs['float32'], atol=0.1)


@pytest.mark.parametrize('pool', [(2, 2, 1), (2, 2, 2), (1, 2, 2), (1, 1, 1)])
def test_sub_pixel_up_convolution_matches_upsample_then_convolve(pool):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5, 6))  # (B, Z, X, Y, C)
  w = jax.random.normal(jax.random.PRNGKey(1), (*pool, 6, 7))
  want = models.conv3d(models.upsample(x, pool, 'nearest'), w, 'native')
  got = models.upconv_nearest(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match='1 or 2'):
    models.upconv_nearest(x, jnp.zeros((3, 3, 1, 6, 7)))
