"""Features and examples shared by the WMH builders: one example a subject.

An example holds what training and evaluation read (``subjects.prepare_subject``):
the FLAIR z-scored and resized to the config grid, the labels on that grid, the
native-resolution labels with their affine and spacing (for scoring at native
resolution), and the subject's id and site.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from wmh_jax import subjects


@dataclasses.dataclass
class WmhConfig(tfds.core.BuilderConfig):
  """Grid of a WMH builder config."""
  grid: tuple[int, int, int] = (128, 128, 16)


def with_grid(config: WmhConfig, grid) -> WmhConfig:
  """``config`` on another grid, under a name that says which."""
  grid = tuple(int(g) for g in grid)
  if grid == tuple(config.grid):
    return config
  return dataclasses.replace(config, name=f'{config.name}_{"x".join(map(str, grid))}',
                             grid=grid)


def features(config: WmhConfig) -> tfds.features.FeaturesDict:
  grid = tuple(config.grid)
  return tfds.features.FeaturesDict({
      'key': tfds.features.Text(),
      'id': tfds.features.Text(),
      'site': tfds.features.Text(),
      'image': tfds.features.Tensor(shape=grid, dtype=np.float32),
      'labels': tfds.features.Tensor(shape=grid, dtype=np.uint8),
      'lesion_fraction': tfds.features.Tensor(shape=grid, dtype=np.float32),
      'native_labels': tfds.features.Tensor(
          shape=(None, None, None), dtype=np.uint8,
          encoding=tfds.features.Encoding.ZLIB),
      'native_shape': tfds.features.Tensor(shape=(3,), dtype=np.int64),
      'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
      'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
  })


def example(s: subjects.SubjectFiles, config: WmhConfig) -> dict:
  """The example of one subject (its NIfTI files decoded here, once)."""
  p = subjects.prepare_subject(s, tuple(config.grid))
  return {
      'key': s.key,
      'id': s.id,
      'site': s.site,
      'image': p['image'],
      'labels': p['labels'],
      'lesion_fraction': p['lesion_fraction'],
      'native_labels': p['native_labels'],
      'native_shape': p['native_shape'].astype(np.int64),
      'affine': p['affine'].astype(np.float64),
      'spacing': p['spacing'].astype(np.float32),
  }
