r"""Predict time per scan at the default network, for two typical acquisitions.

  .venv/bin/python bench/predict_time.py [--repeats=5] [--tta]

Times ``predict.predict`` end to end (read the NIfTI, preprocess, the network on
the scan's grid: 128x128x16 and, with the default's data.grid_max_depth=24,
128x128x24 for the second; resize back, write the mask) for a 512x512x16 2-D FLAIR
(0.47x0.47x8 mm) and a 240x240x48 challenge-like scan (1x1x3 mm). The weights
are freshly initialised: the time does not depend on their values. Prints one
JSON line per scan: median, min and max seconds over the repeats, after one
warm-up run that compiles the network.

This times the per-scan work in one process. The cold start of one scan (a new
process: restore the weights, compile or load from the persistent compilation
cache, segment) is timed on the command line, e.g.

  time python launch.py --mode=predict --workdir=W --input=scan.nii.gz --output=out \
      --overwrite [--compilation_cache=DIR]
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags
import jax
import numpy as np

from configs import default
from wmh_jax import convs
from wmh_jax import inference
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import predict
from wmh_jax import steps

flags.DEFINE_integer('repeats', 5, 'Timed runs per scan.')
flags.DEFINE_bool('tta', False, 'Left-right flip test-time augmentation.')
FLAGS = flags.FLAGS

SCANS = {'2d_flair_512x512x16': ((512, 512, 16), (0.47, 0.47, 8.0)),
         'challenge_240x240x48': ((240, 240, 48), (1.0, 1.0, 3.0))}


def _write_scan(path, shape, spacing):
  g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                  indexing='ij')
  head = g[0] ** 2 + g[1] ** 2 + g[2] ** 2 < 0.8
  rng = np.random.default_rng(0)
  img = np.where(head, 300.0, 5.0) + rng.normal(0, 10, shape)
  nifti_io.save(path, img.astype(np.int16), np.diag([*spacing, 1.0]), dtype=np.int16)


def main(_):
  config = default.get_config()
  config.predict.overlays = False
  model = models.create_model(config.model)
  state = steps.create_train_state(config, jax.random.PRNGKey(0), model,
                                   steps.create_optimizer(config.train))
  prob_fn = inference.make_probability_fn([(model, state)],
                                        config.predict.tta_axes if FLAGS.tta else ())
  with tempfile.TemporaryDirectory() as tmp:
    for name, (shape, spacing) in SCANS.items():
      path = Path(tmp) / f'{name}.nii.gz'
      _write_scan(path, shape, spacing)
      times = []
      for k in range(FLAGS.repeats + 1):
        t0 = time.perf_counter()
        predict.predict(config, None, [str(path)], Path(tmp) / 'out', overwrite=True,
                        probability_fn=prob_fn)
        if k:  # the first run compiles
          times.append(time.perf_counter() - t0)
      print(json.dumps({
          'bench': 'predict', 'scan': name, 'shape': shape, 'spacing_mm': spacing,
          'tta': FLAGS.tta, 'backend': jax.default_backend(),
          'conv_impl': convs.resolve_name(config.model.conv_impl, norm=config.model.norm),
          'cpu_count': os.cpu_count(), 'repeats': len(times),
          'seconds_median': round(statistics.median(times), 3),
          'seconds_min': round(min(times), 3), 'seconds_max': round(max(times), 3)}),
            flush=True)


if __name__ == '__main__':
  app.run(main)
