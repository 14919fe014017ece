"""Atomic writes: unique temporary names, no link followed, 0644 less the umask,
nothing half-written, concurrent writers both succeed."""

import concurrent.futures
import json
import multiprocessing
import os
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from wmh_jax import atomic_write
from wmh_jax import data
from wmh_jax import figures
from wmh_jax import nifti_io
from wmh_jax import refine
from wmh_jax import subjects
from wmh_jax import tables

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


@pytest.fixture
def umask():
  """Sets the process umask for one test (restored after)."""
  old = []

  def set_to(mask):
    old.append(os.umask(mask))
  yield set_to
  if old:
    os.umask(old[0])


def _image(seed=0):
  return np.random.default_rng(seed).normal(100, 10, (16, 12, 6)).astype(np.float32)


def _writers(folder: Path):
  """One ``(target, write())`` per kind of file wmh_jax writes."""
  image = _image()
  mask = image > 110
  return {
      'text': (folder / 'a.json', lambda: atomic_write.write(folder / 'a.json', '{}\n')),
      'nifti': (folder / 'a.nii.gz',
                lambda: nifti_io.save(folder / 'a.nii.gz', image, AFFINE)),
      'png': (folder / 'a_overlay.png',
              lambda: figures.overlay(folder / 'a_overlay.png', image, mask)),
      'csv': (folder / 'a.csv',
              lambda: tables.write_csv(folder / 'a.csv', [{'x': 1.5}], ['x'])),
  }


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
@pytest.mark.parametrize('kind', ['text', 'nifti', 'png', 'csv'])
def test_files_are_0644_less_the_umask(kind, mask, mode, tmp_path, umask):
  umask(mask)
  assert atomic_write.umask() == mask
  assert os.umask(mask) == mask  # reading it did not change it
  target, write = _writers(tmp_path)[kind]
  write()
  assert target.stat().st_mode & 0o777 == mode
  assert os.listdir(tmp_path) == [target.name]  # no temporary file left


@pytest.mark.parametrize('kind', ['text', 'nifti', 'png', 'csv'])
def test_a_link_at_the_target_is_replaced_not_followed(kind, tmp_path):
  outside = tmp_path / 'outside.txt'
  outside.write_bytes(b'precious')
  out = tmp_path / 'out'
  out.mkdir()
  target, write = _writers(out)[kind]
  target.symlink_to(outside)
  write()
  assert outside.read_bytes() == b'precious'
  assert not target.is_symlink() and target.stat().st_size > 1


@pytest.mark.parametrize('kind, old_temp', [
    ('png', '.a_overlay.png'),                        # figures._save
    ('csv', '.a.csv.{pid}.tmp'),                      # tables.write_csv
    ('marker', 'synthetic.tmp'),                      # data._check_marker
    ('cache', '{stem}.tmp.npz')])                     # data.prepare_cached
def test_links_at_the_old_fixed_temporary_names_are_not_followed(
    kind, old_temp, tmp_path, tiny_dataset):
  outside = tmp_path / 'outside.txt'
  outside.write_bytes(b'precious')
  out = tmp_path / 'out'
  out.mkdir()
  subject = subjects.find_subjects(tiny_dataset)[0]
  writers = {**_writers(out),
             'marker': (out / 'synthetic.json',
                        lambda: data._check_marker(out, 0, 'v1')),  # pylint: disable=protected-access
             'cache': (data._cache_path(tmp_path, subject, (8, 8, 4)),  # pylint: disable=protected-access
                       lambda: data.prepare_cached(subject, (8, 8, 4), tmp_path))}
  target, write = writers[kind]
  target.parent.mkdir(exist_ok=True)
  stem = target.name.removesuffix('.npz')
  (target.parent / old_temp.format(pid=os.getpid(), stem=stem)).symlink_to(outside)
  write()
  assert outside.read_bytes() == b'precious'
  assert target.is_file() and not target.is_symlink()
  assert target.stat().st_size > 2


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path):
  target = tmp_path / 'table.csv'
  target.write_text('old\n')

  def half(f):
    f.write(b'new, but not fini')
    raise RuntimeError('disk on fire')

  with pytest.raises(RuntimeError, match='disk on fire'):
    atomic_write.write(target, half)
  assert target.read_text() == 'old\n'
  assert os.listdir(tmp_path) == ['table.csv']
  with pytest.raises(RuntimeError):
    atomic_write.write(tmp_path / 'new.csv', half)
  assert os.listdir(tmp_path) == ['table.csv']


def test_overwrite_false_refuses_an_existing_target_or_link(tmp_path):
  (tmp_path / 'a').write_text('a')
  (tmp_path / 'b').symlink_to(tmp_path / 'missing')
  for name in ('a', 'b'):
    with pytest.raises(FileExistsError, match=f'{tmp_path / name}: already exists'):
      atomic_write.write(tmp_path / name, 'x', overwrite=False)
  assert (tmp_path / 'a').read_text() == 'a'
  assert atomic_write.write(tmp_path / 'c' / 'd', b'x', overwrite=False).read_bytes() == b'x'


def _hammer(folder: str, seed: int, n: int) -> int:
  """``n`` writes of a PNG, a NIfTI and a JSON to fixed targets in ``folder``."""
  folder = Path(folder)
  image = _image(seed)
  for i in range(n):
    figures.overlay(folder / 's_overlay.png', image, image > 110, title=f'{seed} {i}')
    nifti_io.save(folder / 's_wmh.nii.gz', image, AFFINE)
    atomic_write.write(folder / 's.json', json.dumps({'seed': seed, 'i': i}))
  return n


def test_two_processes_writing_the_same_files_both_succeed(tmp_path):
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
    done = list(pool.map(_hammer, [str(tmp_path)] * 2, [1, 2], [20, 20]))
  assert done == [20, 20]
  assert sorted(os.listdir(tmp_path)) == ['s.json', 's_overlay.png', 's_wmh.nii.gz']
  assert matplotlib.image.imread(tmp_path / 's_overlay.png').ndim == 3
  data = nib.load(str(tmp_path / 's_wmh.nii.gz')).get_fdata()
  assert any(np.allclose(data, _image(seed)) for seed in (1, 2))
  assert json.loads((tmp_path / 's.json').read_text())['i'] == 19


def test_without_overwrite_a_file_created_meanwhile_is_kept(tmp_path):
  target = tmp_path / 'a.txt'

  def racing(f):
    target.write_text('the other process')  # appears while this one writes
    f.write(b'mine')

  with pytest.raises(FileExistsError, match='already exists'):
    atomic_write.write(target, racing, overwrite=False)
  assert target.read_text() == 'the other process'
  assert os.listdir(tmp_path) == ['a.txt']


def test_the_refiner_is_saved_through_a_private_folder_and_left_alone(tmp_path):
  refiner = {'params': {'w': np.arange(3.0)}, 'threshold': np.float32(0.5),
             'unet_step': np.int32(7)}
  path = refine.save(tmp_path, refiner)
  assert path == tmp_path / 'refine' / 'step_7'
  assert os.listdir(tmp_path / 'refine') == ['step_7']  # no staging folder left
  np.testing.assert_array_equal(refine.load(tmp_path, 7)['params']['w'], np.arange(3.0))
