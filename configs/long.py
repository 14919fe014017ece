r"""The default, trained longer on more subjects: about 45 min on a 2-core CPU.

Three times the synthetic training subjects (144 of the same seed: the first 48
are the default's) and 1200 steps instead of 280, the same network, loss, data
grid and refiner; validation and test subjects as the default's.

  python launch.py --config=configs/long.py --workdir=runs/long
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.num_subjects = 144
  c.train.num_steps = 1200
  c.train.warmup_steps = 40
  c.train.eval_every_steps = 300
  c.train.checkpoint_every_steps = 100
  return c
