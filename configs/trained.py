r"""The config a run was trained with: ``WORKDIR/config.json`` (``wmh_jax.run_record``).

launch.py uses it for ``--mode=predict`` and ``--mode=evaluate`` when no
``--config`` is given and the workdir has one; ``--config.KEY=VALUE`` overrides
still apply (those that would change the trained network are refused):

  python launch.py --mode=predict --workdir=runs/x --input=scan.nii.gz --output=out
  python launch.py --config=configs/trained.py:runs/x/config.json --mode=evaluate \
      --workdir=runs/x
"""

import os

from wmh_jax import run_record


def get_config(path):
  """The config in ``path`` (WORKDIR/config.json), its relative data folders
  taken from where the run was trained."""
  with open(path, encoding='utf-8') as f:
    config = run_record.config_from_json(f.read(), path)
  return run_record.with_absolute_data_paths(config, os.path.dirname(path))
