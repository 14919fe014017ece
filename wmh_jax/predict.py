"""Predict mode: segment any FLAIR and write the mask on the input's own grid.

  python launch.py --mode=predict --workdir=runs/default --input=scan.nii.gz \
      --output=out/ [--config.predict.tta=True] [--config.predict.overlays=True]

Each input goes through the training preprocessing (canonical RAS orientation,
then ``subjects.preprocess``: z-score inside the head mask, resize): the network
sees the whole scan resized to ``config.data.grid``, as in training; with
``data.input_norm='brain'`` it sees it again z-scored in the brain it found, and
the lesion comes from that second pass (``inference.segment``; the activation
figure shows the first). The lesion
probability (the mean over the ensemble members and flip TTA) is resized back to
the native grid and thresholded (``predict.threshold``); with a refiner
fitted on the workdir's checkpoint (``wmh_jax.refine``, ``config.refine``) the
native voxels are decided again from that probability and the FLAIR around them.
A model with a brain output (``model.brain_output``) also gives the brain
probability, averaged alike; its native mask (``native_probability``) bounds the
lesions: no lesion outside the brain (``predict.mask_to_brain``).
``OUT/<name>_wmh.nii.gz`` (uint8 0/1) keeps the input's shape, axis order, affine
and header, as does ``<name>_brain.nii.gz``; ``<name>_prob.nii.gz``,
``<name>_overlay.png`` and ``<name>_activations.png`` are optional.
``OUT/volumes.csv`` has one row a scan (:data:`VOLUME_FIELDS`): lesion volume and
count, brain volume, and the challenge metrics where the scan has a ``wmh.nii.gz``.

Outputs never replace an input, and a rerun does not read them as scans: the
NIfTI outputs carry ``nifti_io.PREDICT_MARK`` in their header description, and
an input with that mark is skipped with a warning; an input without it but named
like another input's output (``NAME_wmh``, ``NAME_brain``, ``NAME_prob``) is
refused, as is an output path that is an input file. Every input is read and
checked, and the model loaded, before anything is created (the output folder
included); each file is written atomically (``atomic_write``). ``--overwrite``
replaces a scan's outputs and removes those of its outputs this run does not
write (a probability map or overlay from an earlier run).

The segmentation itself is ``wmh_jax.inference`` (``read_scan``, ``load``,
``segment``); this module is the mode: inputs, safety checks, outputs. Only the
weights are restored (``checkpoints.restore_weights``), and launch.py keeps
XLA's compiled programs in a persistent cache (``--compilation_cache``, default
``~/.cache/wmh_jax/jax``), so a second run starts in seconds.
"""

import csv
import dataclasses
import os
from pathlib import Path

from absl import logging
import jax
import numpy as np

from wmh_jax import challenge_metrics
from wmh_jax import figures
from wmh_jax import inference
from wmh_jax import metrics
from wmh_jax import nifti_io
from wmh_jax import subjects
from wmh_jax import tables

# The preprocessing, for callers that check predict's input (the library is
# wmh_jax.inference).
model_input = inference.model_input

# What predict writes for scan NAME: NAME + suffix, in the output folder.
OUTPUT_SUFFIXES = {'mask': '_wmh.nii.gz', 'brain': '_brain.nii.gz',
                   'prob': '_prob.nii.gz', 'overlay': '_overlay.png',
                   'activations': '_activations.png'}
# The outputs a scan could be mistaken for (NIfTI, so read as scans).
_NIFTI_OUTPUTS = ('mask', 'brain', 'prob')
_DESCRIP = {'mask': 'lesion mask', 'brain': 'brain mask', 'prob': 'lesion probability'}
VOLUMES = 'volumes.csv'
NIFTI_EXTENSIONS = ('.nii.gz', '.nii')
# Above this a predicted brain is not a brain (adult brains are 1.0-1.7 L, the
# largest recorded near 2.3 L).
MAX_BRAIN_ML = 2500.0
VOLUME_FIELDS = ('id', 'file', 'lesion_volume_ml', 'lesion_count', 'brain_volume_ml',
                 'brain_dice', *challenge_metrics.METRICS)


class InputError(ValueError):
  """An input predict must not read or must not overwrite (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Scan:
  name: str
  flair: Path
  wmh: Path | None = None
  brain: Path | None = None


def _stem(path: Path) -> str:
  name = path.name
  for ext in NIFTI_EXTENSIONS:
    if name.lower().endswith(ext):
      return name[:-len(ext)]
  return path.stem


def is_nifti(path: Path) -> bool:
  """Whether ``path`` is named as a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
  return path.name.lower().endswith(NIFTI_EXTENSIONS)


def brain_volume_warning(volume_ml: float, path) -> str | None:
  """A one-line warning when the brain mask of ``path`` holds more than any
  human brain (:data:`MAX_BRAIN_ML`), else None. Seen on scans whose background
  is not dark (an intensity offset) or whose contrast is inverted."""
  if volume_ml <= MAX_BRAIN_ML:
    return None
  return (f'{path}: the brain mask holds {volume_ml:.0f} mL, more than any human '
          f'brain ({MAX_BRAIN_ML:.0f} mL): is the background dark and the scan a '
          'FLAIR? The lesion mask is unlikely to be right')


def collect_inputs(paths) -> list[Scan]:
  """Scans named by ``paths``: NIfTI files, folders of them, or challenge layouts.

  A folder holding ``**/pre/FLAIR.nii.gz`` is read as the challenge layout (its
  ``wmh.nii.gz`` and ``brain.nii.gz``, when present, are scored and drawn on the
  overlays); scans are then named
  by subject id (``SITE_ID`` when ids repeat across sites).
  """
  scans = []
  for p in map(Path, paths):
    if p.is_file():
      scans.append(Scan(_stem(p), p))
    elif p.is_dir() and any(p.glob('**/pre/FLAIR.nii.gz')):
      found = subjects.find_subjects(p, missing_mask='keep')
      ids = [s.id for s in found]
      for s in found:
        name = s.id if ids.count(s.id) == 1 else f'{s.site.replace("/", "_")}_{s.id}'
        scans.append(Scan(name, s.flair, s.wmh, s.brain))
    elif p.is_dir():
      # Hidden files are not scans (macOS leaves ._NAME beside each copied file).
      files = sorted(f for f in p.iterdir() if is_nifti(f) and not f.name.startswith('.'))
      if not files:
        raise FileNotFoundError(f'{p}: no NIfTI files in this folder')
      scans += [Scan(_stem(f), f) for f in files]
    else:
      raise FileNotFoundError(f'{p}: no such file or folder')
  if not scans:
    raise FileNotFoundError('predict: no input (pass --input=PATH)')
  names = [s.name for s in scans]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise FileExistsError(f'two inputs would write the same output: {dup[0]}_wmh.nii.gz')
  return scans


def _mark(kind: str) -> str:
  """The header description of a NIfTI output (how a rerun recognises it)."""
  return f'{nifti_io.PREDICT_MARK}: {_DESCRIP[kind]}'


def _output_of(name: str, names) -> str | None:
  """The name among ``names`` whose NIfTI output ``name`` would be (``NAME_wmh``,
  ``NAME_brain``, ``NAME_prob``), or None."""
  for kind in _NIFTI_OUTPUTS:
    tail = OUTPUT_SUFFIXES[kind].removesuffix('.nii.gz')
    if name.endswith(tail) and name[:-len(tail)] in names:
      return name[:-len(tail)]
  return None


def skip_own_outputs(scans: list[Scan]) -> list[Scan]:
  """``scans`` less this tool's own outputs; refuses look-alikes.

  A file whose header carries ``nifti_io.PREDICT_MARK`` was written by predict
  (a rerun into the input folder): skipped with a warning. A file without the
  mark named like the output of another input of the run (``NAME_wmh``,
  ``NAME_brain``, ``NAME_prob`` of an input ``NAME``) may be a scan that an
  output would replace, or an older version's output: refused (``InputError``,
  one line naming them).
  """
  own = [s for s in scans if nifti_io.written_by_predict(s.flair)]
  if own:
    logging.warning('predict: skipping %d earlier output(s) of predict: %s',
                    len(own), ', '.join(str(s.flair) for s in own))
  scans = [s for s in scans if s not in own]
  by_name = {s.name: s for s in scans}
  alike = [(s, by_name[_output_of(s.name, by_name)]) for s in scans
           if _output_of(s.name, by_name)]
  if alike:
    (s, other), more = alike[0], [str(a.flair) for a, _ in alike[1:]]
    raise InputError(
        f'{s.flair}: named like predict\'s output for the input {other.flair}'
        + (f' (also {", ".join(more)})' if more else '')
        + '; rename it, or move it out of the input')
  if not scans:
    raise FileNotFoundError(f'{own[0].flair}: an output of predict, not a scan (so '
                            'is every input)')
  return scans


def output_paths(out_dir: Path, name: str, pconfig=None, brain: bool = False
                 ) -> dict[str, Path]:
  """The files predict writes for scan ``name``; ``brain``: the model has a brain
  output. Without ``pconfig`` every file it could write."""
  every = {k: out_dir / f'{name}{suffix}' for k, suffix in OUTPUT_SUFFIXES.items()}
  if pconfig is None:
    return every
  wanted = {'mask': True, 'brain': brain and pconfig.save_brain,
            'prob': pconfig.save_probabilities, 'overlay': pconfig.overlays,
            'activations': pconfig.activations}
  return {k: p for k, p in every.items() if wanted[k]}


def check_inputs_kept(scans: list[Scan], out_dir: Path) -> None:
  """Refuses a run where any output path (of any kind) is an input file."""
  inputs = [f for s in scans for f in (s.flair, s.wmh, s.brain) if f is not None]
  for s in scans:
    for target in output_paths(out_dir, s.name).values():
      if not target.exists():
        continue
      hit = [f for f in inputs if os.path.samefile(target, f)]
      if hit:
        raise InputError(f'{hit[0]}: the output {target} would replace this input '
                         '(pass another --output)')


def check_outputs_free(targets: list[Path], overwrite: bool) -> None:
  existing = [t for t in targets if t.exists() or t.is_symlink()]
  if existing and not overwrite:
    more = f'; {len(existing)} outputs exist' if len(existing) > 1 else ''
    raise FileExistsError(f'{existing[0]}: already exists (pass --overwrite to '
                          f'replace{more})')


def check_writable(out_dir: Path) -> None:
  """Refuses an output folder that cannot be created or written, creating nothing:
  its nearest existing folder must be a writable folder."""
  probe = out_dir.absolute()
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  reason = None
  if not probe.is_dir():
    reason = f'{probe} is not a folder'
  elif not os.access(probe, os.W_OK | os.X_OK):
    reason = f'no permission to write in {probe}'
  if reason:
    raise PermissionError(f'{out_dir}: output folder is not writable ({reason})')


def make_output_folder(out_dir: Path) -> None:
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PermissionError(f'{out_dir}: output folder is not writable '
                          f'({e.strerror or e})') from e


def remove_stale(out_dir: Path, name: str, written: dict[str, Path]) -> list[Path]:
  """Removes the outputs of scan ``name`` that this run did not write (``--overwrite``:
  nothing of an earlier run is left beside the new outputs as if current)."""
  stale = [p for k, p in output_paths(out_dir, name).items()
           if k not in written and (p.exists() or p.is_symlink())]
  for p in stale:
    p.unlink()
  return stale


def earlier_volumes(path: Path, names, overwrite: bool) -> list[dict]:
  """The rows of an existing ``volumes.csv`` for scans other than ``names`` (a
  table kept across runs into one folder); refuses a file that is not one."""
  if not (path.exists() or path.is_symlink()):
    return []
  try:
    with open(path, newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
      fields = rows[0].keys() if rows else ()
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    rows, fields = None, str(e)
  if rows is None or (rows and 'id' not in fields):
    if overwrite:
      logging.warning('%s: not a table of predict; replaced', path)
      return []
    raise InputError(f'{path}: not a table of predict (no id column); move it or '
                     'pass --overwrite to replace it')
  return [r for r in rows if r['id'] not in set(names)]


def volume_row(scan: Scan, r: dict) -> dict:
  """A ``volumes.csv`` row from a result of :func:`predict`."""
  row = {'id': scan.name, 'file': str(scan.flair), 'lesion_volume_ml': r['volume_ml'],
         'lesion_count': r['lesions']}
  for k in ('brain_volume_ml', 'brain_dice', *challenge_metrics.METRICS):
    if k in r:
      row[k] = r[k]
  return row


def activation_collage(path, members, grid_image, title):
  """The post-ReLU feature maps of every conv layer of the first member."""
  model, state = members[0]
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  _, inter = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                              mutable=['intermediates']))(
                                                  variables, grid_image[None, ..., None])
  blocks = inter['intermediates']
  names = sorted(blocks, key=lambda n: int(n.rsplit('_', 1)[1]))
  n_enc = len(model.encoder_filters) + 1  # encoder levels and the bottleneck
  rows = []
  for part, block_names in (('encoder', names[:n_enc]), ('decoder', names[n_enc:])):
    row = []
    for b in block_names:
      for relu in sorted(blocks[b]):
        a = np.asarray(blocks[b][relu][0])[0]  # (Z, X, Y, C)
        row.append((f'{b}/{relu} ({a.shape[-1]} ch)', a))
    rows.append((part, row))
  figures.activation_collage(path, rows, title)


def predict(config, workdir, inputs, output, overwrite: bool = False,
            probability_fn=None) -> list[dict]:
  """Segments every input; returns one ``{name, mask, volume_ml, lesions}`` a scan
  (with a brain output also ``brain``, ``brain_volume_ml``, and ``brain_dice``
  when the scan has a ``brain.nii.gz``) and writes them to ``OUT/volumes.csv``.

  ``probability_fn`` (model input -> probability, or ``(lesion, brain)``)
  replaces the checkpoints of ``workdir`` and ``config.predict.ensemble`` when
  given. Inputs that are predict's own outputs are skipped, look-alikes refused
  (:func:`skip_own_outputs`); nothing is created before every input is read
  and the model is loaded.
  """
  if not output:
    raise FileNotFoundError('predict: pass --output=DIR for the masks')
  pc = config.predict
  scans = skip_own_outputs(collect_inputs(inputs))
  out_dir = Path(output)
  brain_out = bool(config.model.get('brain_output', False))
  check_inputs_kept(scans, out_dir)
  targets = {s.name: output_paths(out_dir, s.name, pc, brain_out) for s in scans}
  check_outputs_free([p for s in scans for p in output_paths(out_dir, s.name).values()],
                     overwrite)
  table = out_dir / VOLUMES
  rows = earlier_volumes(table, targets, overwrite)
  # Read and check every input before the first file is written; keep only the
  # preprocessed volumes (the native images are read again when drawn).
  prepared = {}
  for s in scans:
    prepared[s.name] = inference.read_scan(s.flair, config)
    shape, affine = prepared[s.name].native_shape, prepared[s.name].affine
    if s.wmh is not None:
      nifti_io.load_labels(s.wmh, affine, shape)
    if s.brain is not None:
      nifti_io.load_brain(s.brain, affine, shape)
  check_writable(out_dir)
  if probability_fn is None:
    segmenter = inference.load(config, workdir)
  elif pc.activations:
    raise ValueError('predict.activations needs a trained model (workdir)')
  else:
    segmenter = inference.Segmenter(probability_fn, config, pc.threshold)
  make_output_folder(out_dir)
  results = []

  def segmented(s):
    return inference.segment(segmenter, prepared[s.name],
                             read_image='overlay' in targets[s.name])

  for k, (s, seg) in enumerate(inference.in_order(segmented, scans,
                                                  inference.scans_at_once(config))):
    scan = prepared.pop(s.name)
    shape, affine = scan.native_shape, scan.affine
    paths = targets[s.name]
    prob, mask, brain, native = seg.probability, seg.mask, seg.brain, seg.image
    nifti_io.save_like(paths['mask'], mask.astype(np.uint8), s.flair,
                       descrip=_mark('mask'))
    if 'prob' in paths:
      nifti_io.save_like(paths['prob'], prob, s.flair, dtype=np.float32,
                         descrip=_mark('prob'))
    if brain is None:
      paths.pop('brain', None)
    else:
      if 'brain' in paths:
        nifti_io.save_like(paths['brain'], brain.astype(np.uint8), s.flair,
                           descrip=_mark('brain'))
    truth = None
    if s.wmh is not None:
      truth = nifti_io.load_labels(s.wmh, affine, shape)
    true_brain = None
    if s.brain is not None and brain is not None:
      true_brain = nifti_io.load_brain(s.brain, affine, shape) == 1
    if 'overlay' in paths:
      figures.overlay(paths['overlay'], native, mask, truth, title=s.name,
                      brain=brain)
    if 'activations' in paths:
      activation_collage(paths['activations'], segmenter.members, scan.volume,
                         s.name)
    if overwrite:
      remove_stale(out_dir, s.name, paths)
    r = {'name': s.name, 'mask': str(paths['mask']),
         'volume_ml': metrics.volume_ml(mask, affine),
         'lesions': challenge_metrics.lesions(mask)[1]}
    if brain is not None:
      if 'brain' in paths:
        r['brain'] = str(paths['brain'])
      r['brain_volume_ml'] = metrics.volume_ml(brain, affine)
      warning = brain_volume_warning(r['brain_volume_ml'], s.flair)
      if warning:
        logging.warning(warning)
    if true_brain is not None:
      r['brain_dice'] = challenge_metrics.dice(true_brain, brain)
    if truth is not None:  # on the file's own axes, as --mode=score reads them
      r.update(challenge_metrics.challenge_metrics(
          *nifti_io.on_file_axes(s.flair, truth, mask)))
    results.append(r)
    rows.append(volume_row(s, r))
    tables.write_csv(table, rows, VOLUME_FIELDS)  # after each scan: a table of
    # the masks written so far, if the run stops
    line = (f'predict {k + 1}/{len(scans)} {s.name}: lesion volume '
            f'{r["volume_ml"]:.2f} mL, {r["lesions"]} lesions'
            + (f', Dice {r["dice"]:.3f}' if truth is not None else '')
            + (f'; brain volume {r["brain_volume_ml"]:.0f} mL' if brain is not None
               else '')
            + (f', brain Dice {r["brain_dice"]:.3f}' if true_brain is not None else '')
            + f' -> {paths["mask"]}')
    logging.info(line)
    print(line, flush=True)
  return results
