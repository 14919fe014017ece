r"""The default, longer: twice its subjects, three times its steps (about 70 min on a 2-core CPU).

The default's network, loss, grid, refiner, validation and test subjects, with
192 synthetic training subjects of the same seed (the first 96 are the
default's: a folder the main job made is extended, not remade) and 2700 steps
(the same learning rate, its cosine three times as long; warm-up 60). Stop 38,
seed 0, each scan on its own slices (docs/results.md, "The longer configuration on
each scan's own slices"): synthetic dev / test 0.713 / 0.736 (the main job,
three seeds: 0.698 / 0.683), MS3SEG Dice 0.692, lesion F1 0.637, AVD 14.5 %
(the main job: 0.684, 0.579, 20.1 %); seed 1: 0.715 / 0.713, MS3SEG 0.677, F1
0.629. Fine-tuned leave-one-out on MS3SEG from seed 0's model: 0.721 (from three
main jobs 0.652-0.702). 71 min from a fresh clone, install included. On generator
3.4.0 (stop 45, seed 0): synthetic dev / test 0.669 / 0.715, MS3SEG Dice 0.678,
lesion F1 0.584 (the main job's seed 0: 0.647 / 0.684, 0.698, 0.651): better on
the synthetic subjects, not on the real scans. On the
16-slice grid (stops 32 and 34) it was the main job's equal on MS3SEG
(0.646-0.655) and better on the synthetic subjects (0.698-0.707).

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
