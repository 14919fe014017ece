"""TFDS builders for WMH data, and loading their splits as prepared subjects.

``wmh_challenge``: a MICCAI 2017 WMH challenge download placed by hand in
``manual_dir``. ``wmh_synthetic``: the project's synthetic subjects
(:mod:`wmh_jax.synthetic`). Both store each subject decoded, z-scored and
resized once, at prepare time (see :mod:`wmh_jax.datasets.examples`).
"""

from wmh_jax.datasets.loading import load_prepared, load_prepared_splits, make_builder
from wmh_jax.datasets.wmh_challenge import WmhChallenge
from wmh_jax.datasets.wmh_synthetic import WmhSynthetic

__all__ = ['WmhChallenge', 'WmhSynthetic', 'load_prepared', 'load_prepared_splits', 'make_builder']
