r"""The default, longer: twice its subjects, three times its steps (35-47 min on a 2-core CPU).

The default's network, loss, grid, refiner, validation and test subjects, with
192 synthetic training subjects of the same seed (the first 96 are the
default's: a folder the main job made is extended, not remade) and 2700 steps
(the same learning rate, its cosine three times as long; warm-up 60). Stop 32,
two seeds (docs/results.md, "A longer configuration"), against the main job's
model: MS3SEG Dice 0.652 / 0.655 (0.652 / 0.659), lesion F1 0.546 / 0.557
(0.528 / 0.568): the same on the real scans; synthetic test 0.698 / 0.705 (0.674
/ 0.667); fine-tuned leave-one-out on MS3SEG from its models 0.678 / 0.686
(from the main job's, seed 0: 0.657). Stop 34, seed 0 on another machine: synthetic
0.707 / 0.707, MS3SEG 0.646 (F1 0.575); leave-one-out from it 0.668 with
configs/finetune.py's flip averaging and without (stop 33's main job there: 0.669).

  python launch.py --config=configs/long.py --workdir=runs/long

The seed's full-width network, longer: configs/seed_width.py.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.num_subjects = 192
  c.train.num_steps = 2700
  c.train.warmup_steps = 60
  c.train.eval_every_steps = 900        # validation three times, as the default's
  return c
