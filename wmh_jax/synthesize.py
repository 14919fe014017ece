"""Synthesize mode: write a synthetic dataset and a contact sheet to look at."""

from pathlib import Path

from absl import logging
import ml_collections

from wmh_jax import data
from wmh_jax import figures
from wmh_jax import nifti_io
from wmh_jax import subjects


def synthesize(config, output, overwrite: bool = False, sheet_cases: int = 6):
  """Writes ``config.data.num_subjects`` subjects under ``output`` (challenge layout).

  Existing complete subjects are kept unless ``overwrite``; ``output/contact_sheet.png``
  shows the first subjects with their masks (and brain masks) outlined.
  """
  output = Path(output)
  if overwrite and output.exists():
    for mask in output.glob('*/*/wmh.nii.gz'):
      mask.unlink()  # marks the subject incomplete: it is generated again
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.root = str(output)
  cfg.data.synthetic = True
  cfg.data.val_root = ''
  data.ensure_synthetic(cfg)
  cases = []
  for s in subjects.find_subjects(output)[:sheet_cases]:
    image, affine = nifti_io.load_image(s.flair)
    labels = nifti_io.load_labels(s.wmh, affine, image.shape)
    brain = (nifti_io.load_brain(s.brain, affine, image.shape) == 1
             if s.brain is not None else None)
    cases.append((s.key, image, labels, brain))
  figures.contact_sheet(output / 'contact_sheet.png', cases)
  logging.info('Wrote %d subjects and %s', config.data.num_subjects,
               output / 'contact_sheet.png')
  print(f'synthesize: {config.data.num_subjects} subjects in {output}, contact '
        f'sheet {output / "contact_sheet.png"}', flush=True)
