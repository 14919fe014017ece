r"""The default setup on a real MICCAI 2017 WMH challenge download, placed by hand.

The code never downloads it. Put the training data (``Utrecht/``, ``Singapore/``,
``Amsterdam/GE3T/``, each ``ID/pre/FLAIR.nii.gz`` + ``ID/wmh.nii.gz``) in one
folder and point ``data.root`` there:

  python launch.py --config=configs/challenge.py --workdir=runs/challenge \
      --config.data.root=/path/to/wmh_challenge

About 20 % of the subjects are validation and 20 % test, each subject placed by
a hash of ``data.split_seed`` and its SITE/ID (``subjects.split_subjects``).
Leave-one-site-out is one line: ``--config.data.val_sites="('Utrecht',)"``.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.root = 'data/wmh_challenge'
  c.data.synthetic = False
  c.data.val_root = ''
  c.data.test_root = ''
  c.data.test_fraction = 0.2            # a test set nothing is chosen on
  return c
