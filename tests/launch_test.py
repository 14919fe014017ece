"""The command line: exit codes and one-line errors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launch(*args):
  return subprocess.run([sys.executable, str(ROOT / 'launch.py'),
                         '--config=' + str(ROOT / 'configs' / 'test.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        check=False)


def test_evaluate_without_checkpoint_fails_cleanly(tiny_dataset, tmp_path):
  r = _launch('--mode=evaluate', f'--workdir={tmp_path / "w"}',
              f'--config.data.root={tiny_dataset}', '--config.data.synthetic=False')
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'no checkpoint' in errors[0], r.stderr[-2000:]
  assert not (tmp_path / 'w' / 'eval').exists()


def test_missing_dataset_fails_cleanly(tmp_path):
  r = _launch('--mode=train', f'--workdir={tmp_path / "w"}',
              f'--config.data.root={tmp_path / "nothing"}',
              '--config.data.synthetic=False')
  assert r.returncode == 1
  assert f'error: {tmp_path / "nothing"}: dataset folder does not exist' in r.stderr


def test_unknown_config_key_is_refused(tmp_path):
  r = _launch(f'--workdir={tmp_path}', '--config.train.num_stepz=3')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f'error: --config.train.num_stepz: no such config key in '
      f'{ROOT / "configs" / "test.py"}; nearest valid keys: train.num_steps, '
      'refine.num_steps, train.warmup_steps']
  assert not tmp_path.joinpath('checkpoints').exists()
