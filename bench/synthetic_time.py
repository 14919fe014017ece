r"""Times the synthetic generator: one subject at default settings, per site.

  .venv/bin/python bench/synthetic_time.py [--subjects=9] [--pool_subjects=6]

Prints one JSON line per subject (generate and write seconds), then the medians
per acquisition family and overall, and the throughput of the main job's
two-process pool (wall seconds a subject, NIfTI writing included). The template
is read once, before timing (the main job's workers read it once each).
"""

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags

from wmh_jax import data
from wmh_jax import nifti_io
from wmh_jax import synthetic

_SUBJECTS = flags.DEFINE_integer('subjects', 9, 'subjects timed one by one')
_POOL = flags.DEFINE_integer('pool_subjects', 6, 'subjects for the pool throughput (0: skip)')
_SEED = flags.DEFINE_integer('seed', 2017, 'dataset seed')


def main(argv):
  del argv
  t = time.perf_counter()
  synthetic.load_template()
  print(json.dumps({'template_load_s': round(time.perf_counter() - t, 2)}), flush=True)
  by_site = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(_SUBJECTS.value):
      t = time.perf_counter()
      s = synthetic.generate_subject(_SEED.value, i)
      gen = time.perf_counter() - t
      t = time.perf_counter()
      folder = synthetic.subject_folder(tmp, _SEED.value, i)
      nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', s.flair, s.affine, dtype=s.dtype)
      nifti_io.save(folder / 'wmh.nii.gz', s.labels, s.affine, dtype='uint8')
      write = time.perf_counter() - t
      site = synthetic.SITES[i % len(synthetic.SITES)]
      by_site.setdefault(site, []).append(gen)
      print(json.dumps({'subject': i, 'site': site, 'shape': list(s.flair.shape),
                        'dtype': str(s.dtype), 'generate_s': round(gen, 2),
                        'write_s': round(write, 2)}), flush=True)
  every = [g for v in by_site.values() for g in v]
  print(json.dumps({
      'median_generate_s': round(statistics.median(every), 2),
      'mean_generate_s': round(statistics.mean(every), 2),
      'median_by_site_s': {k: round(statistics.median(v), 2) for k, v in by_site.items()},
      'cores': os.cpu_count(), 'target_s': 2.0}), flush=True)
  if _POOL.value:
    with tempfile.TemporaryDirectory() as tmp:
      args = [(tmp, _SEED.value + 1, i) for i in range(_POOL.value)]
      t = time.perf_counter()
      data._parallel_map(synthetic.write_one, args, 'subject')  # pylint: disable=protected-access
      wall = time.perf_counter() - t
    print(json.dumps({'pool_subjects': _POOL.value, 'pool_wall_s': round(wall, 1),
                      'pool_s_per_subject': round(wall / _POOL.value, 2),
                      'note': 'includes each worker reading the template and writing NIfTI'}),
          flush=True)


if __name__ == '__main__':
  app.run(main)
