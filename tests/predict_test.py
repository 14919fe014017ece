"""Predict: masks land where the lesion is, on the input's own grid and header;
outputs never replace an input; volumes.csv."""

import csv
import logging
import threading
import time

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from configs import test as test_config
from wmh_jax import atomic_write
from wmh_jax import inference
from wmh_jax import models
from wmh_jax import nifti_io
from wmh_jax import predict
from wmh_jax import steps
from wmh_jax import subjects


def _bright(reference=None):
  """A stand-in for the network: the lesion fraction of each voxel.

  Brain is 400 and lesion 1000 in the scans below; after z-scoring and
  resampling, a voxel's intensity between the brain's median and the maximum is
  its lesion fraction, so thresholding it at 0.5 puts the border half way. The
  two levels come from ``reference`` (the whole preprocessed volume) or else
  from what the function is given.
  """
  def levels(v):
    return np.median(v[v > v.mean()]), v.max()

  fixed = None if reference is None else levels(reference)

  def probability(volume):
    brain, top = fixed or levels(volume)
    return np.clip((volume - brain) / (top - brain), 0, 1)
  return probability


def _scan(shape, affine, lesion_vox, radius_vox):
  g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing='ij')
  c = [(n - 1) / 2 for n in shape]
  brain = sum(((gi - ci) / (0.42 * n)) ** 2 for gi, ci, n in zip(g, c, shape)) < 1
  lesion = sum(((gi - li) / r) ** 2 for gi, li, r in zip(g, lesion_vox, radius_vox)) <= 1
  rng = np.random.default_rng(0)
  img = np.where(brain, 400.0, 20.0) + rng.normal(0, 8, shape)
  img[lesion & brain] = 1000.0
  return img, lesion & brain


def _world(affine, idx):
  return affine[:3, :3] @ np.asarray(idx, float) + affine[:3, 3]


def test_lesion_comes_back_at_its_world_position_lps_oblique_anisotropic(tmp_path):
  shape, spacing = (256, 240, 14), (0.47, 0.47, 8.0)
  c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
  tilt = np.array([[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)], [0, np.sin(0.1), np.cos(0.1)]])
  lps = np.diag([-1.0, -1.0, 1.0])
  affine = np.eye(4)
  affine[:3, :3] = tilt @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ lps @ np.diag(spacing)
  affine[:3, 3] = (55.0, 70.0, -40.0)
  lesion_vox = (160.0, 90.0, 7.0)
  img, truth = _scan(shape, affine, lesion_vox, (14, 14, 1.5))
  # int16 on disk with a scale factor, as scanners write it.
  nii = nib.Nifti1Image(np.round(img / 0.5).astype(np.int16), affine)
  nii.header.set_slope_inter(0.5, 0.0)
  path = tmp_path / 'in' / 'lps_oblique.nii.gz'
  path.parent.mkdir()
  nib.save(nii, str(path))

  cfg = test_config.get_config()
  cfg.data.grid = (128, 128, 16)
  cfg.predict.overlays = True
  reference = inference.model_input(nifti_io.load_image(path)[0], cfg)
  results = predict.predict(cfg, None, [str(path)], tmp_path / 'out',
                            probability_fn=_bright(reference))
  out = nib.load(str(tmp_path / 'out' / 'lps_oblique_wmh.nii.gz'))
  assert out.shape == shape
  np.testing.assert_allclose(out.affine, nii.affine, atol=1e-4)
  assert out.get_data_dtype() == np.uint8
  mask = np.asarray(out.dataobj)
  assert set(np.unique(mask)) == {0, 1}
  centroid = _world(out.affine, np.argwhere(mask).mean(0))
  assert np.linalg.norm(centroid - _world(affine, lesion_vox)) < 1.0  # mm
  dice = 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum())
  assert dice > 0.8
  assert results[0]['lesions'] == 1
  voxel_ml = np.prod(spacing) / 1000
  assert results[0]['volume_ml'] == pytest.approx(mask.sum() * voxel_ml)
  assert (tmp_path / 'out' / 'lps_oblique_overlay.png').stat().st_size > 1000


def test_one_volume_4d_float_input_and_refusals(tmp_path):
  shape = (64, 64, 10)
  affine = np.diag([0.9, 0.9, 3.0, 1.0])
  img, _ = _scan(shape, affine, (40, 30, 5), (5, 5, 1.5))
  path = tmp_path / 'four_d.nii'
  nib.save(nib.Nifti1Image(img[..., None].astype(np.float32), affine), str(path))
  cfg = test_config.get_config()
  cfg.predict.overlays = False
  cfg.predict.save_probabilities = True
  predict.predict(cfg, None, [str(path)], tmp_path / 'out', probability_fn=_bright())
  out = nib.load(str(tmp_path / 'out' / 'four_d_wmh.nii.gz'))
  assert out.shape == shape + (1,)
  prob = nib.load(str(tmp_path / 'out' / 'four_d_prob.nii.gz'))
  assert prob.get_data_dtype() == np.float32 and prob.shape == shape + (1,)
  assert 0.0 <= prob.get_fdata().min() and prob.get_fdata().max() <= 1.0
  # The same again: refused without --overwrite, accepted with it.
  with pytest.raises(FileExistsError, match='four_d_wmh.nii.gz: already exists'):
    predict.predict(cfg, None, [str(path)], tmp_path / 'out', probability_fn=_bright())
  predict.predict(cfg, None, [str(path)], tmp_path / 'out', overwrite=True,
                  probability_fn=_bright())


def test_flip_tta_averages_flipped_predictions_back():
  assert inference.flip_sets((0,)) == [(), (0,)]
  assert inference.flip_sets((0, 1)) == [(), (0,), (1,), (0, 1)]
  cfg = test_config.get_config()
  model = models.create_model(cfg.model)
  state = steps.create_train_state(cfg, jax.random.PRNGKey(0), model,
                                   steps.create_optimizer(cfg.train))
  x = np.random.default_rng(0).normal(size=cfg.data.grid).astype(np.float32)
  plain = inference.make_probability_fn([(model, state)])
  tta = inference.make_probability_fn([(model, state)], tta_axes=(0,))(x)
  expected = (plain(x) + np.flip(plain(np.flip(x, 0).copy()), 0)) / 2
  np.testing.assert_allclose(tta, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(tta, plain(x), atol=1e-6)  # the flip did change something
  # An ensemble of one member twice is that member.
  twice = inference.make_probability_fn([(model, state)] * 2)(x)
  np.testing.assert_allclose(twice, plain(x), rtol=1e-6)


def test_brain_output_bounds_the_lesions_is_written_and_scored(tmp_path, capsys):
  """A bright blob outside the brain (scalp fat) looks like lesion to the stand-in
  network; the brain probability keeps it out of the mask."""
  shape, affine = (56, 44, 12), np.diag([1.0, 1.0, 3.0, 1.0])
  img, truth = _scan(shape, affine, (30.0, 22.0, 6.0), (4, 4, 1.5))
  g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing='ij')
  c = [(n - 1) / 2 for n in shape]
  brain = sum(((gi - ci) / (0.42 * n)) ** 2 for gi, ci, n in zip(g, c, shape)) < 1
  fat = np.zeros(shape, bool)
  fat[0:2, 14:30, 3:9] = True   # a plate on the left, like scalp
  assert not (fat & ndimage.binary_dilation(brain, iterations=2)).any()
  img[fat] = 1000.0
  folder = tmp_path / 'in' / 'Site' / 's1'
  nifti_io.save(folder / 'pre' / 'FLAIR.nii.gz', img.astype(np.float32), affine)
  nifti_io.save(folder / 'wmh.nii.gz', truth.astype(np.uint8), affine, dtype=np.uint8)
  nifti_io.save(folder / 'brain.nii.gz', brain.astype(np.uint8), affine, dtype=np.uint8)

  cfg = test_config.get_config()
  cfg.predict.overlays = True
  reference = inference.model_input(
      nifti_io.load_image(folder / 'pre' / 'FLAIR.nii.gz')[0], cfg)
  lesion_fn = _bright(reference)
  brain_grid = subjects.resize(brain.astype(np.float32), cfg.data.grid)
  with_brain = lambda v: (lesion_fn(v), brain_grid)
  results = predict.predict(cfg, None, [str(tmp_path / 'in')], tmp_path / 'out',
                            probability_fn=with_brain)
  out = nib.load(str(tmp_path / 'out' / 's1_brain.nii.gz'))
  assert out.shape == shape and out.get_data_dtype() == np.uint8
  np.testing.assert_allclose(out.affine, affine, atol=1e-5)
  written = np.asarray(out.dataobj).astype(bool)
  mask = np.asarray(nib.load(str(tmp_path / 'out' / 's1_wmh.nii.gz')).dataobj).astype(bool)
  assert mask.any() and not (mask & ~written).any()   # no lesion outside the brain
  assert not mask[fat].any()
  r = results[0]
  assert r['brain_dice'] > 0.95 and r['dice'] > 0.7
  assert r['brain_volume_ml'] == pytest.approx(written.sum() * 3.0 / 1000)
  assert r['brain'] == str(tmp_path / 'out' / 's1_brain.nii.gz')
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith('predict 1/1')]
  assert 'brain volume' in line[0] and f'brain Dice {r["brain_dice"]:.3f}' in line[0]
  assert (tmp_path / 'out' / 's1_overlay.png').stat().st_size > 1000
  # Without mask_to_brain the blob is "lesion": the test above can fail.
  cfg.predict.mask_to_brain = False
  predict.predict(cfg, None, [str(tmp_path / 'in')], tmp_path / 'out', overwrite=True,
                  probability_fn=with_brain)
  mask = np.asarray(nib.load(str(tmp_path / 'out' / 's1_wmh.nii.gz')).dataobj)
  assert mask[fat].mean() > 0.5
  # A one-output model writes no brain file and reports no brain.
  cfg.model.brain_output = False
  results = predict.predict(cfg, None, [str(tmp_path / 'in')], tmp_path / 'out2',
                            probability_fn=lesion_fn)
  assert not (tmp_path / 'out2' / 's1_brain.nii.gz').exists()
  assert 'brain_volume_ml' not in results[0] and 'brain_dice' not in results[0]


def test_brain_mask_keeps_the_largest_component_with_its_holes_filled():
  prob = np.zeros((20, 20, 10), np.float32)
  prob[3:17, 3:17, 2:8] = 0.9             # the brain
  prob[8:12, 8:12, 4:6] = 0.1             # a hole enclosed in 3-D
  prob[5:7, 10:12, 2:8] = 0.2             # a hole open at both ends: slice-wise only
  prob[0:2, 0:2, 0:2] = 0.9               # a separate blob (an eye, say)
  expected = np.zeros(prob.shape, bool)
  expected[3:17, 3:17, 2:8] = True
  np.testing.assert_array_equal(inference.brain_mask(prob, 0.5), expected)
  assert not inference.brain_mask(np.zeros((4, 4, 4)), 0.5).any()


def test_native_probability_is_zero_outside_the_brain_only_when_asked():
  cfg = test_config.get_config()
  lesion = np.full((8, 8, 4), 0.8, np.float32)
  brain = np.zeros((8, 8, 4), np.float32)
  brain[2:6, 2:6, :] = 1.0
  prob, mask = inference.native_probability((lesion, brain), (16, 16, 8), cfg.predict)
  assert prob.shape == mask.shape == (16, 16, 8) and mask.any() and not mask.all()
  np.testing.assert_array_equal(prob[~mask], 0.0)
  np.testing.assert_allclose(prob[mask], 0.8, rtol=1e-6)
  cfg.predict.mask_to_brain = False
  prob, mask2 = inference.native_probability((lesion, brain), (16, 16, 8), cfg.predict)
  np.testing.assert_array_equal(mask2, mask)
  np.testing.assert_allclose(prob, 0.8, rtol=1e-6)
  prob, none = inference.native_probability(lesion, (16, 16, 8), cfg.predict)
  assert none is None and prob.shape == (16, 16, 8)


def test_tta_and_ensemble_average_the_brain_probability_alike():
  cfg = test_config.get_config()
  model = models.create_model(cfg.model)
  state = steps.create_train_state(cfg, jax.random.PRNGKey(0), model,
                                   steps.create_optimizer(cfg.train))
  x = np.random.default_rng(0).normal(size=cfg.data.grid).astype(np.float32)
  # A brain channel never trained (bias still exactly 0) is not used.
  assert not inference.has_brain_output(model, state)
  assert isinstance(inference.make_probability_fn([(model, state)])(x), np.ndarray)
  params = dict(state.params)
  params['Conv3D_0'] = {**params['Conv3D_0'], 'bias': jnp.array([-4.0, 0.7])}
  trained = state.replace(params=params)
  assert inference.has_brain_output(model, trained)
  plain = inference.make_probability_fn([(model, trained)])
  lesion, brain = plain(x)
  assert lesion.shape == brain.shape == x.shape
  np.testing.assert_allclose(lesion, inference.make_probability_fn([(model, state)])(x),
                             rtol=1e-6)
  t_lesion, t_brain = inference.make_probability_fn([(model, trained)], tta_axes=(0,))(x)
  flipped = plain(np.flip(x, 0).copy())
  np.testing.assert_allclose(t_brain, (brain + np.flip(flipped[1], 0)) / 2, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(t_lesion, (lesion + np.flip(flipped[0], 0)) / 2, rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(t_brain, brain, atol=1e-6)
  # An ensemble with a member without a trained brain gives the lesion alone.
  mixed = inference.make_probability_fn([(model, trained), (model, state)])(x)
  assert isinstance(mixed, np.ndarray)


def _flair(path, shape=(48, 40, 10), lesion=(24, 20, 5)):
  """A FLAIR with one bright lesion, written with nifti_io (a scan, no predict mark)."""
  img, truth = _scan(shape, None, lesion, (4, 4, 1.5))
  nifti_io.save(path, img.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
  return truth


def _no_overlays():
  cfg = test_config.get_config()
  cfg.predict.overlays = False
  return cfg


def test_an_input_named_like_an_output_is_refused_and_never_replaced(tmp_path):
  """--input=DIR --output=DIR --overwrite with DIR/scan.nii.gz and a FLAIR named
  scan_wmh.nii.gz: the mask of scan would replace that FLAIR."""
  _flair(tmp_path / 'scan.nii.gz')
  _flair(tmp_path / 'scan_wmh.nii.gz', lesion=(10, 10, 5))
  before = (tmp_path / 'scan_wmh.nii.gz').read_bytes()
  with pytest.raises(predict.InputError,
                     match=f'{tmp_path / "scan_wmh.nii.gz"}: named like predict\'s '
                           f'output for the input {tmp_path / "scan.nii.gz"}'):
    predict.predict(_no_overlays(), None, [str(tmp_path)], tmp_path, overwrite=True,
                    probability_fn=_bright())
  assert (tmp_path / 'scan_wmh.nii.gz').read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['scan.nii.gz', 'scan_wmh.nii.gz']


def test_an_output_path_that_is_an_input_file_is_refused(tmp_path):
  _flair(tmp_path / 'in' / 'scan.nii.gz')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'scan_prob.nii.gz').symlink_to(tmp_path / 'in' / 'scan.nii.gz')
  with pytest.raises(predict.InputError, match=f'{tmp_path / "in" / "scan.nii.gz"}: '
                     f'the output {out / "scan_prob.nii.gz"} would replace this input'):
    predict.predict(_no_overlays(), None, [str(tmp_path / 'in')], out, overwrite=True,
                    probability_fn=_bright())
  assert [p.name for p in out.iterdir()] == ['scan_prob.nii.gz']


def test_a_rerun_into_the_input_folder_skips_its_own_outputs(tmp_path, caplog):
  _flair(tmp_path / 'scan.nii.gz')
  cfg = _no_overlays()
  cfg.predict.save_probabilities = True
  first = predict.predict(cfg, None, [str(tmp_path)], tmp_path, probability_fn=_bright())
  assert nifti_io.written_by_predict(tmp_path / 'scan_wmh.nii.gz')
  assert nifti_io.written_by_predict(tmp_path / 'scan_prob.nii.gz')
  assert not nifti_io.written_by_predict(tmp_path / 'scan.nii.gz')
  with caplog.at_level(logging.WARNING):
    again = predict.predict(cfg, None, [str(tmp_path)], tmp_path, overwrite=True,
                            probability_fn=_bright())
  assert [r['name'] for r in again] == [r['name'] for r in first] == ['scan']
  assert (f'skipping 2 earlier output(s) of predict: {tmp_path / "scan_prob.nii.gz"}, '
          f'{tmp_path / "scan_wmh.nii.gz"}') in caplog.text
  with pytest.raises(FileNotFoundError, match='scan_wmh.nii.gz: an output of predict'):
    predict.predict(cfg, None, [str(tmp_path / 'scan_wmh.nii.gz')], tmp_path / 'o',
                    probability_fn=_bright())
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'scan.nii.gz', 'scan_prob.nii.gz', 'scan_wmh.nii.gz', 'volumes.csv']


def test_overwrite_removes_the_stale_outputs_of_the_same_scan(tmp_path):
  _flair(tmp_path / 'in' / 'scan.nii.gz')
  _flair(tmp_path / 'in' / 'other.nii.gz')
  cfg = test_config.get_config()
  cfg.predict.save_probabilities = True
  cfg.predict.overlays = True
  out = tmp_path / 'out'
  predict.predict(cfg, None, [str(tmp_path / 'in')], out, probability_fn=_bright())
  assert (out / 'scan_prob.nii.gz').is_file() and (out / 'scan_overlay.png').is_file()
  (out / 'unrelated_prob.nii.gz').write_bytes(b'not ours to remove')
  cfg.predict.save_probabilities = False
  cfg.predict.overlays = False
  with pytest.raises(FileExistsError, match='already exists'):  # kept unless asked
    predict.predict(cfg, None, [str(tmp_path / 'in' / 'scan.nii.gz')], out,
                    probability_fn=_bright())
  predict.predict(cfg, None, [str(tmp_path / 'in' / 'scan.nii.gz')], out, overwrite=True,
                  probability_fn=_bright())
  assert sorted(p.name for p in out.iterdir()) == [
      'other_overlay.png', 'other_prob.nii.gz', 'other_wmh.nii.gz', 'scan_wmh.nii.gz',
      'unrelated_prob.nii.gz', 'volumes.csv']


def test_nothing_is_created_before_the_model_loads(tmp_path):
  _flair(tmp_path / 'scan.nii.gz')
  empty = tmp_path / 'not_trained'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    predict.predict(_no_overlays(), empty, [str(tmp_path / 'scan.nii.gz')],
                    tmp_path / 'out' / 'deeper')
  assert not (tmp_path / 'out').exists()
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(PermissionError, match='output folder is not writable'):
    predict.predict(_no_overlays(), None, [str(tmp_path / 'scan.nii.gz')],
                    blocker / 'out', probability_fn=_bright())


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_volumes_csv_has_one_row_a_scan_with_metrics_when_there_is_truth(tmp_path):
  """A challenge-layout folder (one subject with wmh.nii.gz and brain.nii.gz, one
  without) and a lone scan, through the stand-in network with a brain output."""
  shape, affine = (48, 40, 10), np.diag([1.0, 1.0, 3.0, 1.0])
  truth = _flair(tmp_path / 'in' / 'Site' / 's1' / 'pre' / 'FLAIR.nii.gz')
  labels = truth.astype(np.uint8)
  labels[0, 0, 0] = 2  # label 2 is masked out of the scoring
  nifti_io.save(tmp_path / 'in' / 'Site' / 's1' / 'wmh.nii.gz', labels, affine,
                dtype=np.uint8)
  _flair(tmp_path / 'in' / 'Site' / 's2' / 'pre' / 'FLAIR.nii.gz', lesion=(14, 14, 4))
  _flair(tmp_path / 'lone.nii.gz', lesion=(30, 12, 6))
  cfg = _no_overlays()
  g = np.meshgrid(*[np.linspace(-1, 1, n) for n in cfg.data.grid], indexing='ij')
  brain_grid = (sum(x * x for x in g) < 0.7).astype(np.float32)
  fn = _bright()
  out = tmp_path / 'out'
  results = predict.predict(cfg, None, [str(tmp_path / 'in'), str(tmp_path / 'lone.nii.gz')],
                            out, probability_fn=lambda v: (fn(v), brain_grid))
  rows = _read_csv(out / 'volumes.csv')
  assert [r['id'] for r in rows] == ['s1', 's2', 'lone']
  assert rows[0]['file'] == str(tmp_path / 'in' / 'Site' / 's1' / 'pre' / 'FLAIR.nii.gz')
  assert rows[2]['file'] == str(tmp_path / 'lone.nii.gz')
  for row, r in zip(rows, results):
    mask = np.asarray(nib.load(r['mask']).dataobj).astype(bool)
    brain = np.asarray(nib.load(r['brain']).dataobj).astype(bool)
    assert int(row['lesion_count']) == ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1
    assert float(row['lesion_volume_ml']) == pytest.approx(mask.sum() * 3e-3, rel=1e-5)
    assert float(row['brain_volume_ml']) == pytest.approx(brain.sum() * 3e-3, rel=1e-5)
  s1 = np.asarray(nib.load(results[0]['mask']).dataobj).astype(bool)
  expected = 2 * (s1 & truth).sum() / (s1.sum() + truth.sum())  # label 2 not truth
  assert float(rows[0]['dice']) == pytest.approx(expected, abs=1e-5) and expected > 0.7
  for k in ('hd95_mm', 'avd_percent', 'lesion_recall', 'lesion_f1'):
    assert float(rows[0][k]) == pytest.approx(results[0][k], rel=1e-5)
  assert float(rows[0]['lesion_recall']) == 1.0
  assert all(rows[i][k] == '' for i in (1, 2) for k in ('dice', 'hd95_mm', 'brain_dice'))
  # Another run into the folder adds its rows; a rerun of a scan replaces its row.
  _flair(tmp_path / 'later.nii.gz', lesion=(20, 30, 5))
  predict.predict(cfg, None, [str(tmp_path / 'later.nii.gz')], out,
                  probability_fn=fn)
  predict.predict(cfg, None, [str(tmp_path / 'lone.nii.gz')], out, overwrite=True,
                  probability_fn=fn)
  rows = _read_csv(out / 'volumes.csv')
  assert [r['id'] for r in rows] == ['s1', 's2', 'later', 'lone']
  assert rows[3]['brain_volume_ml'] == ''  # this time without a brain output
  assert (out / 'volumes.csv').stat().st_mode & 0o777 == 0o644 & ~atomic_write.umask()


def test_two_scans_at_once_give_the_masks_and_table_of_one_at_a_time(tmp_path):
  """``predict.workers=2`` segments two scans at once (the stand-in network sees
  two calls in flight) and writes what one at a time writes, in input order."""
  for k, lesion in enumerate([(24, 20, 5), (14, 14, 4), (30, 12, 6), (20, 30, 5)]):
    _flair(tmp_path / 'in' / f'scan{k}.nii.gz', lesion=lesion)
  fn, lock, live, most = _bright(), threading.Lock(), [0], [0]

  def slow(volume):
    with lock:
      live[0] += 1
      most[0] = max(most[0], live[0])
    time.sleep(0.05)
    with lock:
      live[0] -= 1
    return fn(volume)

  tables, masks = {}, {}
  for workers in (1, 2):
    cfg = _no_overlays()
    cfg.predict.workers = workers
    most[0] = 0
    out = tmp_path / f'out{workers}'
    results = predict.predict(cfg, None, [str(tmp_path / 'in')], out,
                              probability_fn=slow)
    assert most[0] == workers
    tables[workers] = _read_csv(out / 'volumes.csv')
    masks[workers] = [np.asarray(nib.load(r['mask']).dataobj) for r in results]
  assert [r['id'] for r in tables[2]] == ['scan0', 'scan1', 'scan2', 'scan3']
  assert tables[2] == tables[1]
  for a, b in zip(masks[1], masks[2]):
    np.testing.assert_array_equal(a, b)
    assert a.sum() > 0


def test_upper_case_extensions_are_nifti_hidden_files_are_not(tmp_path):
  for name in ('SCAN.NII.GZ', 'other.Nii', 'notes.txt', '._SCAN.NII.GZ', '.x.nii'):
    (tmp_path / name).write_bytes(b'')
  scans = predict.collect_inputs([str(tmp_path)])
  assert [(s.name, s.flair.name) for s in scans] == [('SCAN', 'SCAN.NII.GZ'),
                                                     ('other', 'other.Nii')]
  assert [s.name for s in predict.collect_inputs([str(tmp_path / 'SCAN.NII.GZ')])] == ['SCAN']


def test_a_brain_larger_than_any_human_one_is_warned_about(tmp_path, caplog):
  """A FLAIR whose background is not dark can make the whole head "brain": the
  run says so, naming the scan, and a scan of a brain's size gets no warning."""
  shape, affine = (48, 48, 10), np.diag([5.0, 5.0, 5.0, 1.0])   # 2.88 L of voxels
  img, _ = _scan(shape, affine, (24.0, 24.0, 5.0), (3, 3, 1))
  nifti_io.save(tmp_path / 'in' / 'big.nii.gz', img.astype(np.float32), affine)
  nifti_io.save(tmp_path / 'in' / 'small.nii.gz', img.astype(np.float32),
                np.diag([2.0, 2.0, 5.0, 1.0]))               # 0.46 L
  cfg = test_config.get_config()
  cfg.predict.overlays = False
  whole = lambda v: (np.zeros(v.shape, np.float32), np.ones(v.shape, np.float32))
  with caplog.at_level(logging.WARNING):
    results = predict.predict(cfg, None, [str(tmp_path / 'in')], tmp_path / 'out',
                              probability_fn=whole)
  assert [round(r['brain_volume_ml']) for r in results] == [2880, 461]
  warned = [r.getMessage() for r in caplog.records if 'more than any human' in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith(str(tmp_path / 'in' / 'big.nii.gz'))
  assert 'holds 2880 mL' in warned[0]
