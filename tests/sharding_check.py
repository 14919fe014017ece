"""Run by sharding_test.py in a fresh process with 2 host devices (XLA_FLAGS).

Prints JSON: the loss and gradients of one batch of 2 computed on one device
and sharded over a ('data',) mesh of 2, and one full train step each way.
"""

import functools
import json

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from configs import test as test_config
from wmh_jax import losses
from wmh_jax import models
from wmh_jax import steps


def main():
  cfg = test_config.get_config()
  cfg.train.batch_size = 2
  cfg.model.brain_output = False  # the batch has no brain masks: the seed's network
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.train)
  state = steps.create_train_state(cfg, jax.random.PRNGKey(0), model, tx)
  rng = np.random.default_rng(0)
  shape = steps.input_shape(cfg)
  batch = {'image': rng.normal(size=shape).astype(np.float32),
           'labels': (rng.random(shape[:-1]) < 0.05).astype(np.uint8)}

  def loss_fn(params, b):
    return losses.segmentation_loss(model.apply({'params': params}, b['image']),
                                    b['labels'], cfg.loss)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      loss_config=cfg.loss))
  key = jax.random.PRNGKey(1)
  one = jax.devices()[0]
  loss1, g1 = grad_fn(jax.device_put(state.params, one), jax.device_put(batch, one))
  s1, m1 = step_fn(jax.device_put(state, one), jax.device_put(batch, one), key)

  mesh = steps.make_mesh()
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sb = jax.device_put(batch, data)
  loss2, g2 = grad_fn(jax.device_put(state.params, rep), sb)
  s2, m2 = step_fn(jax.device_put(state, rep), sb, key)

  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(g1))
  print(json.dumps({
      'devices': jax.device_count(),
      'batch_shards': len(sb['image'].sharding.device_set),
      'loss_one': float(loss1), 'loss_sharded': float(loss2),
      'grad_max_abs_diff': diff(g1, g2), 'grad_max_abs': scale,
      'step_loss_one': float(m1['loss']), 'step_loss_sharded': float(m2['loss']),
      'params_after_step_max_abs_diff': diff(s1.params, s2.params),
  }))


if __name__ == '__main__':
  main()
