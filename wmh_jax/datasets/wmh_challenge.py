"""``wmh_challenge``: the MICCAI 2017 WMH Segmentation Challenge, placed by hand.

Nothing is downloaded. ``manual_dir`` holds the challenge layout, either the
training sites directly (``Utrecht/``, ``Singapore/``, ``Amsterdam/GE3T/``) or
the release's ``training/`` and ``test/`` folders (the test set's scanners
become a ``test`` split). Each subject is ``SITE[/SCANNER]/ID/pre/FLAIR.nii.gz``
and ``SITE[/SCANNER]/ID/wmh.nii.gz`` (0 background, 1 WMH, 2 other pathology).

Splits are by subject, by the function the folder runs use
(``subjects.split_subjects``: a hash of ``split_seed`` and each SITE/ID key);
``val_fraction`` of the subjects form ``validation``, ``test_fraction`` (with
the release's ``test/`` subjects) ``test``. ``data.load_splits`` passes the
config's ``data.split_seed``, ``data.val_fraction`` and ``data.test_fraction``,
and the builder config's name records them (``loading.make_builder``), so data
prepared with another split is never reused. Every example keeps its site, so
leave-one-site-out is a filter on ``site`` (``data.val_sites`` in the config).
"""

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from wmh_jax import subjects
from wmh_jax.datasets import examples

INSTRUCTIONS = """\
Download the MICCAI 2017 WMH Segmentation Challenge data (https://wmh.isi.uu.nl)
by hand and unpack it into the manual_dir (config.data.root for the main job),
so that it holds SITE/ID/pre/FLAIR.nii.gz and SITE/ID/wmh.nii.gz, e.g.
Utrecht/0/pre/FLAIR.nii.gz, Singapore/50/..., Amsterdam/GE3T/100/... (or the
release's training/ and test/ folders with that layout inside).
"""


@dataclasses.dataclass
class ChallengeConfig(examples.WmhConfig):
  val_fraction: float = 0.2
  test_fraction: float = 0.0
  split_seed: int = 0


class WmhChallenge(tfds.core.GeneratorBasedBuilder):
  """The WMH challenge training (and test) subjects, prepared on a grid."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  BUILDER_CONFIGS = [
      ChallengeConfig(name='flair', description='FLAIR only (the seed study).'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=examples.features(self.builder_config),
        homepage='https://wmh.isi.uu.nl',
        description='MICCAI 2017 WMH Segmentation Challenge, one example a subject.')

  def _split_generators(self, dl_manager):
    root = manual_root(dl_manager)
    training = root / 'training' if (root / 'training').is_dir() else root
    found = subjects.find_subjects(training)
    cfg = self.builder_config
    train, val, test = subjects.split_subjects(found, cfg.val_fraction, cfg.split_seed,
                                               test_fraction=cfg.test_fraction)
    splits = {'train': self._generate_examples(train),
              'validation': self._generate_examples(val)}
    if (root / 'test').is_dir():
      test += subjects.find_subjects(root / 'test')
    if test:
      splits['test'] = self._generate_examples(test)
    return splits

  def _generate_examples(self, subject_files):
    for s in subject_files:
      yield s.key, examples.example(s, self.builder_config)


def manual_root(dl_manager) -> Path:
  """``dl_manager.manual_dir``, or a one-line error saying where the files go."""
  given = getattr(dl_manager, '_manual_dir', None)
  try:
    return Path(dl_manager.manual_dir)
  except AssertionError as e:  # TFDS asserts on a missing or empty manual_dir
    where = given or '(no manual_dir given)'
    raise FileNotFoundError(
        f'{where}: empty or missing; put the challenge data there by hand as '
        'SITE/ID/pre/FLAIR.nii.gz and SITE/ID/wmh.nii.gz (Utrecht/0/..., '
        'Singapore/50/..., Amsterdam/GE3T/100/...); nothing is downloaded') from e
