r"""The default setup on a real MICCAI 2017 WMH challenge download, placed by hand.

The code never downloads it. Put the training data (``Utrecht/``, ``Singapore/``,
``Amsterdam/GE3T/``, each ``ID/pre/FLAIR.nii.gz`` + ``ID/wmh.nii.gz``) in one
folder and point ``data.root`` there:

  python launch.py --config=configs/challenge.py --workdir=runs/challenge \
      --config.data.root=/path/to/wmh_challenge

20 % of each site's subjects are held out (by subject). Leave-one-site-out is one
line: ``--config.data.val_sites="('Utrecht',)"``.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.root = 'data/wmh_challenge'
  c.data.synthetic = False
  c.data.val_root = ''
  return c
