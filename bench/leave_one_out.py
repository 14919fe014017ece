r"""Leave-one-out over the labelled subjects of a challenge-layout folder.

  .venv/bin/python bench/leave_one_out.py --data=/path/to/my_scans \
      --init_from=runs/default --workdir=runs/loo [--config=configs/finetune.py] \
      [--config.train.num_steps=60 ...] [--overwrite]

For every subject k it runs, as a subprocess,

  launch.py --config=CONFIG --workdir=ROOT/fold_<id> --config.data.root=DATA
      --config.data.val_ids="('<SITE/ID>',)" [--config.train.init_from=INIT] ...

(train_and_evaluate: fine-tune on all other subjects, fit the refiner, evaluate
subject k), then prints each fold's metrics (``ROOT/fold_<id>/eval/metrics.csv``)
and their means, and writes ``ROOT/leave_one_out.csv``. Without --init_from every
fold trains from scratch. Folds that already have results are kept unless
--overwrite (which deletes and reruns them). The folds share one cache of
prepared subjects (``ROOT/prepared``). Any ``--config.KEY=VALUE`` goes to every fold.
"""

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

from absl import app
from absl import flags

from wmh_jax import challenge_metrics
from wmh_jax import subjects
from wmh_jax import tables

REPO = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
# Printed per fold (all of metrics.csv's columns go to leave_one_out.csv).
SHOWN = (*challenge_metrics.METRICS, 'dice_unet', 'true_volume_ml', 'pred_volume_ml')


def _define_flags():  # not at import: the tests import this module beside launch.py
  flags.DEFINE_string('data', None, 'Challenge-layout folder of labelled scans.')
  flags.DEFINE_string('init_from', '', 'Trained workdir to fine-tune from ('
                      "'': every fold trains from scratch).")
  flags.DEFINE_string('workdir', 'runs/leave_one_out', 'Root of the fold workdirs.')
  flags.DEFINE_string('config', str(REPO / 'configs' / 'finetune.py'), 'Config file.')
  flags.DEFINE_bool('overwrite', False, 'Rerun folds that already have results.')
  flags.mark_flag_as_required('data')


def fold_names(found) -> dict[str, str]:
  """``{SITE/ID key: fold folder name}``: ``fold_<ID>``, or ``fold_<SITE>_<ID>``
  when IDs repeat across sites."""
  ids = [s.id for s in found]
  unique = len(set(ids)) == len(ids)
  return {s.key: 'fold_' + (s.id if unique else s.key.replace('/', '_'))
          for s in found}


def fold_command(config, fold_dir, data, key, init_from, overrides) -> list[str]:
  cmd = [sys.executable, str(REPO / 'launch.py'), f'--config={config}',
         '--mode=train_and_evaluate', f'--workdir={fold_dir}',
         f'--config.data.root={data}', '--config.data.synthetic=False',
         "--config.data.val_root=", "--config.data.val_sites=()",
         f'--config.data.val_ids=("{key}",)']
  if init_from:
    cmd.append(f'--config.train.init_from={init_from}')
  return cmd + list(overrides)


def _number(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    return math.nan


def collect(root, folds: dict[str, str]) -> list[dict]:
  """One row a held-out subject: ``fold`` plus the columns of each fold's
  ``eval/metrics.csv`` (numbers as floats). Folds without results are left out."""
  rows = []
  for name in folds.values():
    path = Path(root) / name / 'eval' / 'metrics.csv'
    if not path.exists():
      continue
    with open(path, newline='') as f:
      for r in csv.DictReader(f):
        rows.append({'fold': name, 'subject': r.pop('subject'),
                     **{k: _number(v) for k, v in r.items()}})
  return rows


def means(rows: list[dict]) -> dict:
  """Mean of every numeric column over the folds, NaNs (undefined) left out."""
  out = {'fold': 'mean', 'subject': f'{len(rows)} subjects'}
  for k in (rows[0] if rows else {}):
    if k not in out:
      vals = [r[k] for r in rows if not math.isnan(r[k])]
      out[k] = sum(vals) / len(vals) if vals else math.nan
  return out


def table(rows: list[dict]) -> str:
  """Per-fold rows and the means, as aligned text."""
  cols = [c for c in SHOWN if rows and c in rows[0]]
  lines = [f'{"fold":<24} {"subject":<24}' + ''.join(f' {c:>14}' for c in cols)]
  for r in [*rows, means(rows)]:
    lines.append(f'{r["fold"]:<24} {r["subject"]:<24}'
                 + ''.join(f' {r[c]:>14.4g}' for c in cols))
  return '\n'.join(lines)


def write_summary(root, rows: list[dict]) -> Path:
  """``ROOT/leave_one_out.csv``: the rows, then their means."""
  fields = list(rows[0]) if rows else ['fold', 'subject']
  return tables.write_csv(Path(root) / 'leave_one_out.csv', [*rows, means(rows)],
                          fields)


def main(argv, overrides=()):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  data = Path(FLAGS.data).absolute()
  root = Path(FLAGS.workdir).absolute()
  config = Path(FLAGS.config).absolute()
  init_from = str(Path(FLAGS.init_from).absolute()) if FLAGS.init_from else ''
  try:
    found = subjects.find_subjects(data)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if len(found) < 2:
    print(f'error: {data}: leave-one-out needs two or more labelled subjects',
          file=sys.stderr)
    return 1
  folds = fold_names(found)
  (root / 'prepared').mkdir(parents=True, exist_ok=True)
  for k, (key, name) in enumerate(folds.items()):
    fold_dir = root / name
    if (fold_dir / 'eval' / 'metrics.csv').exists():
      if not FLAGS.overwrite:
        print(f'leave-one-out {k + 1}/{len(folds)} {key}: {fold_dir} has results '
              '(--overwrite reruns it)', flush=True)
        continue
      shutil.rmtree(fold_dir)
    print(f'leave-one-out {k + 1}/{len(folds)}: holding out {key} -> {fold_dir}',
          flush=True)
    fold_dir.mkdir(parents=True, exist_ok=True)
    if not (fold_dir / 'prepared').exists():  # one decode of each subject in all
      (fold_dir / 'prepared').symlink_to(root / 'prepared', target_is_directory=True)
    rc = subprocess.run(fold_command(config, fold_dir, data, key, init_from, overrides),
                        check=False).returncode
    if rc:
      print(f'error: fold {key} ({fold_dir}) failed with exit status {rc}; see '
            'above', file=sys.stderr)
      return 1
  rows = collect(root, folds)
  print(table(rows))
  print(f'-> {write_summary(root, rows)}')
  return 0


if __name__ == '__main__':
  _define_flags()
  # --config.KEY=VALUE goes to the folds' launch.py (which checks the keys).
  passed = [a for a in sys.argv[1:] if a.startswith('--config.')]
  app.run(lambda argv: main(argv, passed),
          argv=[a for a in sys.argv if not a.startswith('--config.')])
