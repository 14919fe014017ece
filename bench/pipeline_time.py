r"""CPU seconds a training example costs the tf.data pipeline, as the main job uses it.

  .venv/bin/python bench/pipeline_time.py [--grid=128,128,16] [--examples=30] [--repeats=5]

Times ``input_pipeline.train_dataset`` at the default config (augmentation on,
64x64 crops of every slice, 80 % lesion-centred, soft target, brain fraction and the
brain-z-scored image) over eight random grid volumes with ten small lesions
each. Prints one JSON line: process CPU seconds and wall seconds per example,
the median over the repeats. CPU seconds (all of tf.data's threads together)
are what the pipeline takes from the train step on a CPU; on an accelerator
they bound the examples a second the host can feed.
"""

import json
from pathlib import Path
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, str(REPO))

from configs import default  # pylint: disable=g-import-not-at-top
from wmh_jax import input_pipeline  # pylint: disable=g-import-not-at-top

flags.DEFINE_list('grid', ['128', '128', '16'], 'data.grid (X,Y,Z).')
flags.DEFINE_integer('examples', 30, 'Examples per timed repeat.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats (after five warm-up examples).')
FLAGS = flags.FLAGS


def _arrays(grid, n=8, lesions=10):
  """``n`` stacked examples with everything the default pipeline carries."""
  rng = np.random.default_rng(0)
  labels = np.zeros((n, *grid), np.uint8)
  for k in range(n):
    for _ in range(lesions):
      x, y = (int(rng.integers(8, g - 8)) for g in grid[:2])
      z = int(rng.integers(2, grid[2] - 2))
      labels[k, x - 2:x + 2, y - 2:y + 2, z - 1:z + 1] = 1
  image = rng.normal(size=(n, *grid)).astype(np.float32)
  return {'image': image, 'labels': labels,
          'spacing': np.tile(np.float32([1.7, 1.9, 6.0]), (n, 1)),
          'target': labels.astype(np.float32),
          'brain': np.ones((n, *grid), np.float32),
          'has_brain': np.ones(n, np.float32),
          'image_brain': (image * 0.5 + 1.0).astype(np.float32)}


def main(_):
  config = default.get_config()
  config.data.grid = tuple(int(v) for v in FLAGS.grid)
  config.train.batch_size = 1  # a batch is an example
  it = input_pipeline.train_dataset(_arrays(config.data.grid), config).as_numpy_iterator()
  for _ in range(5):
    next(it)  # start the workers
  cpu, wall = [], []
  for _ in range(FLAGS.repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(FLAGS.examples):
      next(it)
    cpu.append((time.process_time() - c0) / FLAGS.examples)
    wall.append((time.perf_counter() - t0) / FLAGS.examples)
  print(json.dumps({
      'bench': 'input_pipeline_crops', 'grid': list(config.data.grid),
      'patch': list(config.train.patch_size), 'examples': FLAGS.examples,
      'repeats': FLAGS.repeats,
      'cpu_s_per_example': round(statistics.median(cpu), 4),
      'cpu_s_per_example_all': [round(c, 4) for c in cpu],
      'wall_s_per_example': round(statistics.median(wall), 4)}), flush=True)


if __name__ == '__main__':
  app.run(main)
