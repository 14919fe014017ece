"""Building the WMH TFDS datasets and reading their splits as prepared subjects."""

import dataclasses

import tensorflow_datasets as tfds

from wmh_jax import subjects
from wmh_jax.datasets import examples
from wmh_jax.datasets.wmh_challenge import WmhChallenge
from wmh_jax.datasets.wmh_synthetic import WmhSynthetic

BUILDERS = {'wmh_challenge': WmhChallenge, 'wmh_synthetic': WmhSynthetic}


def make_builder(name: str, grid, data_dir, **fields) -> tfds.core.DatasetBuilder:
  """The builder ``DATASET[/CONFIG]`` on ``grid``; ``fields`` change config fields
  (a new config name records them, so differently built data never mix)."""
  ds_name, _, config_name = name.partition('/')
  if ds_name not in BUILDERS:
    raise ValueError(f'data.tfds: unknown dataset {name!r} (one of '
                     f'{", ".join(BUILDERS)})')
  cls = BUILDERS[ds_name]
  configs = {c.name: c for c in cls.BUILDER_CONFIGS}
  config_name = config_name or cls.BUILDER_CONFIGS[0].name
  if config_name not in configs:
    raise ValueError(f'data.tfds: {ds_name} has no config {config_name!r} (one of '
                     f'{", ".join(configs)})')
  config = examples.with_grid(configs[config_name], grid)
  if fields:
    tag = '_'.join(f'{k}{v}' for k, v in sorted(fields.items()))
    config = dataclasses.replace(config, name=f'{config.name}_{tag}', **fields)
  return cls(config=config, data_dir=str(data_dir))


def as_prepared(builder, split: str) -> list[dict]:
  """The examples of ``split`` as numpy dicts (``subjects.prepare_subject``'s keys)."""
  out = []
  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    d = dict(ex)
    for k in ('key', 'id', 'site'):
      d[k] = d[k].decode()
    out.append(d)
  return sorted(out, key=lambda d: d['key'])


def load_prepared(name: str, grid, data_dir, manual_dir=None, val_sites=(),
                  **fields) -> dict[str, list[dict]]:
  """Prepares ``name`` once (decoding its NIfTI) and returns its ``train``,
  ``val`` and ``test`` (empty when the dataset has none) examples.

  With ``val_sites`` the train and validation splits are pooled and the
  subjects of those sites become the validation set (leave-site-out).
  """
  builder = make_builder(name, grid, data_dir, **fields)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else str(manual_dir)))
  train, val = as_prepared(builder, 'train'), as_prepared(builder, 'validation')
  test = as_prepared(builder, 'test') if 'test' in builder.info.splits else []
  if val_sites:
    train, val = subjects.split_by_sites(train + val, val_sites, lambda d: d['site'])
  return {'train': train, 'val': val, 'test': test}


def load_prepared_splits(name: str, grid, data_dir, manual_dir=None, val_sites=(),
                         **fields) -> tuple[list[dict], list[dict]]:
  """``(train, val)`` of :func:`load_prepared`."""
  splits = load_prepared(name, grid, data_dir, manual_dir, val_sites, **fields)
  return splits['train'], splits['val']
