"""Every bad input gets one ``error:`` line naming the file, exit 1, and no output.

The command line runs in-process (``launch.main`` with parsed flags) so that the
many cases stay fast; ``launch_test.py`` covers real subprocesses.
"""

import functools
import gzip
import io
import logging
import sys
import time
from pathlib import Path

from absl import flags
import nibabel as nib
import numpy as np
import pytest

import launch
from wmh_jax import nifti_io
from wmh_jax import subjects

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (40, 36, 12)
AFFINE = np.diag([1.2, 1.2, 3.0, 1.0])


def _image():
  g = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing='ij')
  noise = np.random.default_rng(0).normal(0, 3, SHAPE)
  return (np.where(sum(x ** 2 for x in g) < 0.8, 100.0, 5.0) + noise).astype(np.float32)


def _labels():
  labels = np.zeros(SHAPE, np.uint8)
  labels[18:22, 16:20, 5:7] = 1
  return labels


def _write_gz_bytes(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


# Broken FLAIR images: (writer, expected message).
def _not_nifti(p):
  _write_gz_bytes(p, b'this is not an image\n')


def _not_nifti_gz(p):
  _write_gz_bytes(p, gzip.compress(b'\0' * 400))


def _truncated(p):
  nifti_io.save(p, _image(), AFFINE)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])


def _array(arr):
  return lambda p: nifti_io.save(p, arr, AFFINE)


def _with(value):
  img = _image()
  img[20, 18, 6] = value
  return img


def _singular_affine(p):
  """Two voxel axes along the same world direction (sform only: nibabel cannot
  decompose such an affine into a qform)."""
  axes = AFFINE.copy()
  axes[:3, 2] = axes[:3, 0]
  img = nib.Nifti1Image(_image(), AFFINE)
  img.header.set_sform(axes, code=1)
  img.header.set_qform(None, code=0)
  p.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(_image(), None, img.header), str(p))


def _nib_save(arr):
  def write(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(p))
  return write


HUGE_SHAPE = (1024, 1024, 512)


@functools.lru_cache(maxsize=None)
def huge_nifti_gz() -> bytes:
  """A complete .nii.gz of 1024x1024x512 uint8 zeros: 512 MiB of voxels in ~0.5 MB."""
  hdr = nib.Nifti1Header()
  hdr.set_data_shape(HUGE_SHAPE)
  hdr.set_data_dtype(np.uint8)
  hdr.set_sform(AFFINE, code=1)
  hdr['vox_offset'] = 352
  buf = io.BytesIO()
  with gzip.GzipFile(fileobj=buf, mode='wb', compresslevel=6) as f:
    hdr.write_to(f)
    f.write(b'\0' * (352 - hdr.sizeof_hdr))    # no extensions
    chunk = b'\0' * (1 << 24)
    for _ in range(int(np.prod(HUGE_SHAPE)) // len(chunk)):
      f.write(chunk)
  return buf.getvalue()


IMAGE_CASES = {
    'not_nifti': (_not_nifti, 'cannot read NIfTI'),
    'gzip_of_garbage': (_not_nifti_gz, 'cannot read NIfTI'),
    'truncated': (_truncated, 'cannot read NIfTI'),
    '2d': (_array(np.ones((40, 36), np.float32)), 'expected a 3-D image'),
    '4d_two_volumes': (_array(np.ones((*SHAPE, 2), np.float32)), 'expected a 3-D image'),
    'nan': (_array(_with(np.nan)), 'NaN or infinite'),
    'inf': (_array(_with(np.inf)), 'NaN or infinite'),
    'constant': (_array(np.full(SHAPE, 7.0, np.float32)), 'constant'),
    'too_small': (_array(np.ones((40, 36, 1), np.float32)), 'too small to resample'),
    'singular_affine': (_singular_affine, 'affine is singular'),
    'rgb': (_nib_save(np.zeros(SHAPE, [('R', 'u1'), ('G', 'u1'), ('B', 'u1')])),
            'RGB or structured voxels'),
    'complex': (_nib_save(_image().astype(np.complex64)), 'complex voxels'),
    'too_many_voxels': (lambda p: _write_gz_bytes(p, huge_nifti_gz()),
                        'shape (1024, 1024, 512) is 536,870,912 voxels, more than '
                        'the limit of 134,217,728'),
}


def _bad_mask_shape(p):
  nifti_io.save(p, np.zeros((40, 36, 11), np.uint8), AFFINE, dtype=np.uint8)


def _bad_mask_affine(p):
  nifti_io.save(p, _labels(), np.diag([1.0, 1.0, 3.0, 1.0]), dtype=np.uint8)


def _bad_mask_values(p):
  labels = _labels()
  labels[0, 0, 0] = 3
  nifti_io.save(p, labels, AFFINE, dtype=np.uint8)


def _bad_mask_fraction(p):
  nifti_io.save(p, _labels() * 0.5, AFFINE, dtype=np.float32)


MASK_CASES = {
    'mask_shape': (_bad_mask_shape, 'differs from the image shape'),
    'mask_affine': (_bad_mask_affine, 'mask affine differs from the image affine'),
    'labels_outside': (_bad_mask_values, 'labels must be in {0, 1, 2}, found [3]'),
    'labels_not_integer': (_bad_mask_fraction, 'labels must be integers'),
}


def _dataset(root: Path, flair_writer=None, mask_writer=None) -> Path:
  """One subject in the challenge layout, with the FLAIR or mask broken."""
  folder = root / 'Utrecht' / '0'
  flair, wmh = folder / 'pre' / 'FLAIR.nii.gz', folder / 'wmh.nii.gz'
  flair.parent.mkdir(parents=True)
  (flair_writer or _array(_image()))(flair)
  (mask_writer or (lambda p: nifti_io.save(p, _labels(), AFFINE, dtype=np.uint8)))(wmh)
  return root


def run_launch(capsys, *args, **overrides) -> tuple[int, list[str]]:
  """``(exit status, error lines)`` of ``launch.py ARGS`` with configs/test.py.

  ``overrides`` (``data__root=...``) stand for ``--config.data.root=...``:
  ml_collections registers override flags from ``sys.argv`` at import time, so
  in-process runs set them on the parsed config instead. Predict calls name a
  ``--workdir`` under ``tmp_path``: the default, ``runs/default`` in the current
  folder, may hold a trained model of another grid.
  """
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['launch.py', f'--config={ROOT / "configs" / "test.py"}', *args])
  for key, value in overrides.items():
    *parents, leaf = key.split('__')
    node = flags.FLAGS.config
    for p in parents:
      node = node[p]
    node[leaf] = value
  try:
    launch.main(['launch.py'])
    code = 0
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  return code, [l for l in err.splitlines() if l.startswith('error:')]


def _files(folder: Path) -> list[Path]:
  return [p for p in folder.rglob('*') if p.is_file()] if folder.exists() else []


def _assert_refused(code, errors, path, message):
  assert code == 1
  assert len(errors) == 1, errors
  assert errors[0].startswith(f'error: {path}: '), errors[0]
  assert message in errors[0], errors[0]


@pytest.mark.parametrize('case', sorted(IMAGE_CASES) + sorted(MASK_CASES))
def test_train_refuses_bad_data(case, tmp_path, capsys):
  writer, message = {**IMAGE_CASES, **MASK_CASES}[case]
  kw = {'flair_writer': writer} if case in IMAGE_CASES else {'mask_writer': writer}
  root = _dataset(tmp_path / 'data', **kw)
  bad = root / 'Utrecht' / '0' / ('pre/FLAIR.nii.gz' if case in IMAGE_CASES else 'wmh.nii.gz')
  code, errors = run_launch(capsys, '--mode=train', f'--workdir={tmp_path / "w"}',
                            data__root=str(root), data__synthetic=False)
  _assert_refused(code, errors, bad, message)
  assert not _files(tmp_path / 'w')


@pytest.mark.parametrize('key', ['threshold_rule', 'min_lesion_rule'])
def test_train_refuses_a_bad_refiner_rule_before_it_trains(key, tmp_path, capsys):
  root = _dataset(tmp_path / 'data')
  code, errors = run_launch(capsys, '--mode=train', f'--workdir={tmp_path / "w"}',
                            data__root=str(root), data__synthetic=False,
                            **{f'refine__{key}': 'nope'})
  assert code == 1
  assert errors == [f"error: refine.{key}: 'nope' is not one of best, one_se"], errors
  assert not _files(tmp_path / 'w')


@pytest.mark.parametrize('case', sorted(IMAGE_CASES))
def test_predict_refuses_bad_images(case, tmp_path, capsys):
  writer, message = IMAGE_CASES[case]
  good = tmp_path / 'in' / 'good.nii.gz'
  _array(_image())(good)
  bad = tmp_path / 'in' / 'bad.nii.gz'
  writer(bad)
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={good}', f'--input={bad}',
                            f'--output={tmp_path / "out"}')
  _assert_refused(code, errors, bad, message)
  assert not (tmp_path / 'out').exists()  # not even the good scan's mask


@pytest.mark.parametrize('case', sorted(MASK_CASES))
def test_predict_on_a_challenge_folder_refuses_bad_masks(case, tmp_path, capsys):
  writer, message = MASK_CASES[case]
  root = _dataset(tmp_path / 'data', mask_writer=writer)
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={root}', f'--output={tmp_path / "out"}')
  _assert_refused(code, errors, root / 'Utrecht' / '0' / 'wmh.nii.gz', message)
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('case', ['not_nifti', 'truncated', '2d', 'nan'])
def test_score_refuses_bad_predictions(case, tmp_path, capsys):
  writer, message = IMAGE_CASES[case]
  nifti_io.save(tmp_path / 'gt' / 'Utrecht' / '0' / 'wmh.nii.gz', _labels(), AFFINE,
                dtype=np.uint8)
  bad = tmp_path / 'pred' / '0_wmh.nii.gz'
  writer(bad)
  code, errors = run_launch(capsys, '--mode=score', f'--gt={tmp_path / "gt"}',
                            f'--pred={tmp_path / "pred"}')
  _assert_refused(code, errors, bad, message)
  assert not (tmp_path / 'pred' / 'scores.csv').exists()


def test_score_refuses_bad_ground_truth_labels(tmp_path, capsys):
  gt = tmp_path / 'gt' / 'Utrecht' / '0' / 'wmh.nii.gz'
  _bad_mask_values(gt)
  nifti_io.save(tmp_path / 'pred' / '0_wmh.nii.gz', _labels(), AFFINE, dtype=np.uint8)
  code, errors = run_launch(capsys, '--mode=score', f'--gt={tmp_path / "gt"}',
                            f'--pred={tmp_path / "pred"}')
  _assert_refused(code, errors, gt, 'labels must be in {0, 1, 2}')


def test_missing_paths_and_empty_folders(tmp_path, capsys):
  nothing = tmp_path / 'nothing'
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={nothing}', f'--output={tmp_path / "out"}')
  _assert_refused(code, errors, nothing, 'no such file or folder')
  empty = tmp_path / 'empty'
  empty.mkdir()
  code, errors = run_launch(capsys, '--mode=train', f'--workdir={tmp_path / "w"}',
                            data__root=str(empty), data__synthetic=False)
  _assert_refused(code, errors, empty, 'no subjects found')
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={empty}', f'--output={tmp_path / "out"}')
  _assert_refused(code, errors, empty, 'no NIfTI files')
  code, errors = run_launch(capsys, '--mode=score', f'--gt={empty}', f'--pred={empty}')
  _assert_refused(code, errors, empty, 'no ground truth found')
  code, errors = run_launch(capsys, '--mode=evaluate', f'--workdir={tmp_path / "w"}',
                            data__root=str(empty), data__synthetic=False)
  _assert_refused(code, errors, empty, 'no subjects found')
  assert not _files(tmp_path / 'w') and not (tmp_path / 'out').exists()


def test_subjects_without_masks_are_skipped_with_a_warning_listing_them(tmp_path,
                                                                        caplog):
  root = _dataset(tmp_path / 'data')
  (root / 'Utrecht' / '7' / 'pre').mkdir(parents=True)
  _array(_image())(root / 'Utrecht' / '7' / 'pre' / 'FLAIR.nii.gz')
  with caplog.at_level(logging.WARNING):
    found = subjects.find_subjects(root)
  assert 'skipping 1 subjects without wmh.nii.gz: Utrecht/7' in caplog.text
  assert [s.key for s in found] == ['Utrecht/0']
  assert [s.key for s in subjects.find_subjects(root, 'keep')] == ['Utrecht/0', 'Utrecht/7']
  with pytest.raises(FileNotFoundError, match='Utrecht/7'):
    subjects.find_subjects(root, 'error')


def test_unwritable_output_folder(tmp_path, capsys):
  image = tmp_path / 'scan.nii.gz'
  _array(_image())(image)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={image}', f'--output={blocker / "out"}')
  _assert_refused(code, errors, blocker / 'out', 'not writable')


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
  image = tmp_path / 'scan.nii.gz'
  _array(_image())(image)
  out = tmp_path / 'out' / 'scan_wmh.nii.gz'
  out.parent.mkdir()
  out.write_bytes(b'precious')
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={image}', f'--output={tmp_path / "out"}')
  _assert_refused(code, errors, out, 'already exists (pass --overwrite')
  assert out.read_bytes() == b'precious'
  # evaluate refuses to replace an earlier evaluation in the same way.
  metrics = tmp_path / 'w' / 'eval' / 'metrics.csv'
  metrics.parent.mkdir(parents=True)
  metrics.write_text('subject,dice\n')
  code, errors = run_launch(capsys, '--mode=evaluate', f'--workdir={tmp_path / "w"}')
  _assert_refused(code, errors, metrics, 'already exists (pass --overwrite')
  assert metrics.read_text() == 'subject,dice\n'


def test_unknown_config_key_lists_the_nearest_keys(capsys):
  with pytest.raises(SystemExit) as e:
    launch.check_config_overrides(['launch.py', f'--config={ROOT / "configs" / "test.py"}',
                                   '--config.train.lerning_rate=1e-3'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith('error: --config.train.lerning_rate: no such config key')
  assert 'train.learning_rate' in err[0]


def test_the_voxel_limit_is_a_config_key(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(nifti_io, 'MAX_VOXELS', nifti_io.MAX_VOXELS)  # restored after
  scan = tmp_path / 'in' / 'scan.nii.gz'
  _array(_image())(scan)
  code, errors = run_launch(capsys, '--mode=predict', f'--workdir={tmp_path / "w"}',
                            f'--input={scan}', f'--output={tmp_path / "out"}',
                            data__max_voxels=1000)
  _assert_refused(code, errors, scan, 'more than the limit of 1,000 '
                  '(--config.data.max_voxels raises it)')
  assert nifti_io.MAX_VOXELS == 1000


def test_a_huge_header_is_refused_before_the_data_are_read(tmp_path, monkeypatch):
  huge = tmp_path / 'huge.nii.gz'
  huge.write_bytes(huge_nifti_gz())
  assert huge.stat().st_size < 2_000_000
  assert nib.load(str(huge)).shape == HUGE_SHAPE   # a valid file, all data there
  t = time.perf_counter()
  with pytest.raises(nifti_io.NiftiError) as e:
    nifti_io.load_image(huge)
  assert time.perf_counter() - t < 0.5               # decoding it takes seconds
  assert str(e.value) == (f'{huge}: shape (1024, 1024, 512) is 536,870,912 voxels, '
                          'more than the limit of 134,217,728 '
                          '(--config.data.max_voxels raises it)')
  # The limit: the module default (from the environment) or per call.
  small = tmp_path / 'small.nii.gz'
  _array(_image())(small)
  with pytest.raises(nifti_io.NiftiError, match='more than the limit of 1,000'):
    nifti_io.load_image(small, max_voxels=1000)
  monkeypatch.setattr(nifti_io, 'MAX_VOXELS', 1000)
  with pytest.raises(nifti_io.NiftiError, match='more than the limit of 1,000'):
    nifti_io.load(small)
  assert nifti_io.load(small, max_voxels=np.prod(SHAPE)).shape == SHAPE


@pytest.mark.parametrize('scale', [1e19, 1e36])  # 1e36: near float32's max
def test_huge_intensities_are_z_scored_exactly(scale, tmp_path):
  # float32 statistics overflowed: every z-score 0, an empty mask, exit 0.
  want = None
  for s in (1.0, scale):
    folder = tmp_path / str(s) / 'Utrecht' / '0'
    nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', (_image() * s).astype(np.float32),
                  AFFINE)
    files = subjects.SubjectFiles('Utrecht', '0', folder / 'pre' / 'FLAIR.nii.gz', None)
    got = subjects.prepare_subject(files, (16, 16, 8))['image']
    assert np.all(np.isfinite(got)) and got.std() > 0.5
    if want is None:
      want = got
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_non_finite_z_scores_are_refused_in_one_line():
  image = _image().astype(np.float64)
  image[:20] *= 1e307                      # finite, but its variance is not
  with pytest.raises(nifti_io.NiftiError, match=r'^scan: intensities out of range'):
    subjects.preprocess(image, (16, 16, 8), 'scan')


def test_huge_intensities_reach_predict_and_the_refiner_as_the_same_z_scores():
  # Predict's and the refiner's own preprocessing paths, not only training's.
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from wmh_jax import predict  # pylint: disable=g-import-not-at-top
  cfg = test_config.get_config()
  image = _image().astype(np.float64)
  want = predict.model_input(image, cfg, 'scan')
  got = predict.model_input(image * 1e19, cfg, 'scan')
  assert np.all(np.isfinite(got)) and got.std() > 0.5
  np.testing.assert_allclose(got, want, atol=1e-5)
  brain = _image() > 50
  np.testing.assert_allclose(subjects.zscore(image * 1e19, 'scan', brain),
                             subjects.zscore(image, 'scan', brain), atol=1e-5)


def test_jax_modes_run_from_another_folder_with_the_projects_configs(tmp_path):
  # launch_test covers --mode=score; here a mode that starts JAX and reads the
  # config's data: from another folder it reaches its own refusal (no subjects),
  # not 'no such config file', and a configs/test.py there is not executed.
  import subprocess  # pylint: disable=g-import-not-at-top
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'test.py').write_text('raise SystemExit("not this")\n')
  (tmp_path / 'empty').mkdir()
  r = subprocess.run([sys.executable, str(ROOT / 'launch.py'), '--config=configs/test.py',
                      '--mode=evaluate', '--workdir=w', '--config.data.root=empty',
                      '--config.data.synthetic=False'],
                     capture_output=True, text=True, cwd=tmp_path, timeout=300,
                     check=False)
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'no subjects found' in errors[0], r.stderr[-3000:]
  assert 'not this' not in r.stderr + r.stdout
