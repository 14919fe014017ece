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
  cfg = default.get_config().model
  cfg.brain_output = False      # the seed's network: one output channel
  model = models.create_model(cfg)
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


def test_brain_output_adds_one_channel_and_nothing_else():
  cfg = default.get_config().model
  assert cfg.brain_output  # the default
  x = jnp.zeros((1, 16, 16, 8, 1))
  cfg.encoder_filters, cfg.decoder_filters = ((4, 6), (6, 8), (8, 8)), (4, 6, 8)
  cfg.bottleneck_filters = (8, 8)
  two = models.create_model(cfg)
  cfg.brain_output = False
  one = models.create_model(cfg)
  p2 = two.init(jax.random.PRNGKey(0), x)['params']
  p1 = one.init(jax.random.PRNGKey(0), x)['params']
  assert two.apply({'params': p2}, x).shape == (1, 16, 16, 8, 2)
  assert one.apply({'params': p1}, x).shape == (1, 16, 16, 8, 1)
  # Same tree; only the output convolution is one channel wider.
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  flat1 = dict(jax.tree_util.tree_flatten_with_path(p1)[0])
  flat2 = dict(jax.tree_util.tree_flatten_with_path(p2)[0])
  differ = {jax.tree_util.keystr(k) for k in flat1 if flat1[k].shape != flat2[k].shape}
  assert differ == {"['Conv3D_0']['bias']", "['Conv3D_0']['kernel']"}
  assert _count(p2) - _count(p1) == 4 + 1   # decoder_filters[0] inputs + a bias
  # Initial biases: the lesion logit's output_bias (-4), the brain logit's 0.
  np.testing.assert_array_equal(models.output_bias(p2), [-4.0, 0.0])
  np.testing.assert_array_equal(models.output_bias(p1), [-4.0])
  # brain_output=False is today's network: same initial weights as before the option.
  legacy = models.UNet3D(**{f: getattr(one, f) for f in (
      'encoder_filters', 'kernel_sizes', 'pool_sizes', 'bottleneck_filters',
      'bottleneck_kernel', 'decoder_filters', 'norm', 'upsampling', 'conv_impl',
      'output_bias', 'dtype')})
  for a, b in zip(jax.tree.leaves(p1),
                  jax.tree.leaves(legacy.init(jax.random.PRNGKey(0), x)['params'])):
    np.testing.assert_array_equal(a, b)


def _small(impl, norm='none'):
  return models.UNet3D(encoder_filters=((4, 6), (6, 8)),
                       kernel_sizes=((3, 3, 1), (3, 3, 3)),
                       pool_sizes=((2, 2, 1), (2, 2, 2)),
                       bottleneck_filters=(8, 12), bottleneck_kernel=(3, 3, 3),
                       decoder_filters=(4, 6), conv_impl=impl, norm=norm)


def _random_biases(params, key, scale=0.1):
  """``params`` with every bias drawn from N(0, scale^2).

  With the initial zero biases, a ReLU whose whole receptive field is off sees a
  pre-activation of exactly 0, which rounding in another convolution
  implementation moves to +-3e-7, flipping the ReLU's derivative: gradients
  then differ by design, not by error.
  """
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  return jax.tree_util.tree_unflatten(tree, [
      scale * jax.random.normal(k, v.shape, v.dtype) if path[-1].key == 'bias' else v
      for k, (path, v) in zip(keys, flat)])


@pytest.mark.parametrize('impl', ['fold2d', 'winograd'])
@pytest.mark.parametrize('norm', ['none', 'group'])
def test_fold2d_and_winograd_match_native_forward_and_gradients(impl, norm):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4, 1))
  native, fold = _small('native', norm), _small(impl, norm)
  params = _random_biases(native.init(jax.random.PRNGKey(0), x)['params'],
                          jax.random.PRNGKey(2))
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


@pytest.mark.parametrize('brain_output', [False, True])
def test_forward_mode_through_the_network_under_every_conv_impl(brain_output):
  # In float64: among the ~1e5 pre-activations of the test network a few sit
  # within float32 rounding of 0, and a ReLU flipped there changes the tangent
  # by design. x64 is on inside this test only.
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  cfg = test_config.get_config().model
  cfg.brain_output = brain_output
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 4, 1))  # F(4x4, 3x3) at level 1
  cfg.conv_impl = 'native'
  params = _random_biases(models.create_model(cfg).init(jax.random.PRNGKey(0), x)[
      'params'], jax.random.PRNGKey(2))
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 100))
  with jax.enable_x64(True):
    cfg.dtype = 'float64'
    params, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
    dparams = jax.tree.map(lambda p: 0.1 * jax.random.normal(next(keys), p.shape,
                                                             jnp.float64), params)
    dx = jax.random.normal(next(keys), x.shape, jnp.float64)
    out = {}
    for impl in ('native', 'fold2d', 'winograd'):
      cfg.conv_impl = impl
      model = models.create_model(cfg)
      f = lambda p, v, m=model: m.apply({'params': p}, v)
      out[impl] = jax.jit(lambda *a, f=f: jax.jvp(f, a[:2], a[2:]))(
          params, x, dparams, dx)
      if impl == 'winograd':  # forward and reverse mode: transposes of each other
        ct = jax.random.normal(next(keys), out[impl][0].shape, jnp.float32)
        gp, gx = jax.jit(lambda p, v, c, f=f: jax.vjp(f, p, v)[1](c))(params, x, ct)
        inner = sum(float(jnp.vdot(u, v)) for u, v in zip(
            jax.tree.leaves((gp, gx)), jax.tree.leaves((dparams, dx))))
        np.testing.assert_allclose(inner, float(jnp.vdot(ct, out[impl][1])),
                                   rtol=1e-5)
  assert out['native'][1].shape[-1] == (2 if brain_output else 1)
  scale = float(jnp.max(jnp.abs(out['native'][1])))
  for impl in ('fold2d', 'winograd'):
    np.testing.assert_allclose(out[impl][0], out['native'][0], atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(out[impl][1] - out['native'][1]))) < 1e-4 * scale


def test_jacfwd_and_hessian_of_a_layer_under_every_conv_impl():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 4, 4, 8))  # (B, Z, X, Y, C)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 8, 2)) / 8
  out = {}
  for impl in ('native', 'fold2d', 'winograd'):
    conv = lambda v, i=impl: models.conv3d(v, w, i)
    out[impl] = (jax.jacfwd(conv)(x),
                 jax.hessian(lambda v, c=conv: jnp.sum(jnp.sin(c(v))))(x))
  for impl in ('fold2d', 'winograd'):
    for got, want in zip(out[impl], out['native']):
      np.testing.assert_allclose(got, want, atol=1e-4)


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
