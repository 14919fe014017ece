"""End-to-end: train_and_evaluate and evaluate on tiny NIfTI files."""

import csv
import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib

import jax
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import NO_BRAIN
from conftest import NoWeights
from configs import test as test_config
from wmh_jax import challenge_metrics
from wmh_jax import checkpoints
from wmh_jax import data
from wmh_jax import evaluate
from wmh_jax import inference
from wmh_jax import predict
from wmh_jax import refine
from wmh_jax import score
from wmh_jax import train


def _scalars(workdir, tag):
  """``{step: value}`` of one scalar tag, read back from the event files."""
  acc = event_accumulator.EventAccumulator(str(workdir),
                                           size_guidance={'tensors': 0})
  acc.Reload()
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
  """``(config, workdir, final state)`` of one 24-step run on the tiny dataset."""
  workdir = tmp_path_factory.mktemp('trained')
  cfg = test_config.for_dataset(tiny_dataset, num_steps=24, log_every_steps=4)
  return cfg, workdir, train.train_and_evaluate(cfg, workdir)


def _check_against_score(rows, summary, dataset, workdir):
  """evaluate's rows equal --mode=score's on the masks it wrote (the same numbers,
  to 1e-9), its Dice equals one computed here from the files, and each summary
  mean is over the cases its count says."""
  gt = workdir / 'gt'
  for r in rows:  # the validation subjects' ground truth, in the challenge layout
    (gt / r['subject']).mkdir(parents=True)
    shutil.copy(dataset / r['subject'] / 'wmh.nii.gz', gt / r['subject'])
  scored = score.score(gt, workdir / 'eval' / 'pred', output=workdir / 'score')
  by_score = {r['subject']: r for r in csv.DictReader(open(workdir / 'score' /
                                                           'scores.csv'))}
  assert sorted(by_score) == sorted(r['subject'] for r in rows)
  for r in rows:
    for field in score.FIELDS[1:]:
      np.testing.assert_allclose(float(r[field]), float(by_score[r['subject']][field]),
                                 rtol=0, atol=1e-9, err_msg=f'{r["subject"]} {field}')
    pred = np.asarray(nib.load(workdir / 'eval' / 'pred' / (
        r['subject'].replace('/', '_') + '_wmh.nii.gz')).dataobj) > 0
    labels = np.asarray(nib.load(dataset / r['subject'] / 'wmh.nii.gz').dataobj)
    truth, found = labels == 1, pred & (labels != 2)
    assert float(r['dice']) == pytest.approx(
        2 * (truth & found).sum() / (truth.sum() + found.sum()), abs=1e-12)
  for m in challenge_metrics.METRICS:
    finite = [float(r[m]) for r in rows if np.isfinite(float(r[m]))]
    assert summary[f'{m}_n'] == scored[f'{m}_n'] == len(finite)
    np.testing.assert_allclose(summary[m], np.mean(finite) if finite else np.nan,
                               atol=1e-12)
    np.testing.assert_allclose(scored[m], summary[m], atol=1e-12)


def test_train_loss_goes_down_writes_checkpoints_events_and_evaluates(trained,
                                                                       tiny_dataset):
  cfg, tmp_path, state = trained
  assert int(state.step) == 24
  loss = _scalars(tmp_path, 'train/loss')
  assert sorted(loss) == [4, 8, 12, 16, 20, 24]
  assert loss[24] < loss[4]
  rate = _scalars(tmp_path, 'train/steps_per_sec')  # each log window's own
  assert sorted(rate) == sorted(loss) and all(0 < r < np.inf for r in rate.values())
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['18', '24']
  assert list(tmp_path.glob('events.out.tfevents.*'))
  # The native refiner is fitted on the final U-Net step and used by evaluate.
  assert (tmp_path / 'refine' / 'step_24').is_dir()
  summary = evaluate.evaluate(cfg, tmp_path)
  assert summary['refined']
  rows = list(csv.DictReader(open(tmp_path / 'eval' / 'metrics.csv')))
  assert len(rows) == summary['subjects'] == 3
  assert set(rows[0]) == set(evaluate.FIELDS + evaluate.BRAIN_FIELDS)
  assert all(float(r['true_volume_ml']) > 0 for r in rows)
  assert len(list((tmp_path / 'eval' / 'pred').glob('*_wmh.nii.gz'))) == 3
  _check_against_score(rows, summary, tiny_dataset, tmp_path)
  assert list((tmp_path / 'eval' / 'overlays').glob('*.png'))
  # The brain output: a mask a subject, scored where brain.nii.gz exists.
  brains = sorted((tmp_path / 'eval' / 'pred').glob('*_brain.nii.gz'))
  assert len(brains) == 3
  scored = [float(r['brain_dice']) for r in rows
            if r['subject'] != NO_BRAIN and r['brain_dice']]
  assert len(scored) == len([r for r in rows if r['subject'] != NO_BRAIN]) >= 2
  assert summary['brain_dice_mean'] == pytest.approx(np.mean(scored), abs=1e-5)
  assert summary['brain_dice_mean'] > 0.8
  for b in brains:  # no lesion outside the brain mask
    wmh = nib.load(str(b).replace('_brain.nii.gz', '_wmh.nii.gz')).get_fdata() > 0
    assert not (wmh & (nib.load(str(b)).get_fdata() == 0)).any()


def test_eta_leaves_out_the_compile_and_passes_over_a_validation():
  assert train.eta([], 900) == train.eta([40.0], 890) == '-- (compiling)'
  # A 40 s first window (the compile), steps of 0.8 s, one window of 6 s (a
  # validation): the median of the windows after the first.
  assert train.eta([40.0, 0.8, 0.8, 6.0], 600) == '8m00s'
  assert train.eta([40.0, 0.8, 0.8, 6.0], 0) == '0m00s'
  # Only the last ETA_WINDOWS count: the machine got faster.
  windows = [40.0] + [2.0] * 20 + [1.0] * train.ETA_WINDOWS
  assert train.eta(windows, 60) == '1m00s'


def test_refiner_is_fitted_on_the_probability_predict_refines(trained):
  """With ``predict.tta`` the refiner's training cases are the flip-averaged
  U-Net probability that predict and evaluate hand it, not the plain one."""
  cfg, workdir, _ = trained
  plain_cfg = cfg.copy_and_resolve_references()
  plain_cfg.refine.num_subjects = 1  # the first training subject
  tta = plain_cfg.copy_and_resolve_references()
  tta.predict.tta = True
  train_set = data.load_split(tta, workdir, 'train')
  model, state = checkpoints.restore_weights(tta, workdir)
  (fitted, _, _, _), = train.refiner_cases(tta, train_set, model, state)
  p = train_set[0]
  given = inference.segment(inference.load(tta, workdir), inference.ScanInput(
      p['image'], p['native_shape'], p['spacing'], p['source']), before_refine=True)
  np.testing.assert_allclose(fitted, given.unet_probability, rtol=0, atol=1e-6)
  (plain, _, _, _), = train.refiner_cases(plain_cfg, train_set, model, state)
  assert np.abs(plain - fitted).max() > 1e-3  # the flips did change it


def test_resume_continues_where_the_stopped_run_left(tiny_dataset, tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  straight = train.train_and_evaluate(cfg, tmp_path / 'a')
  # A run that stopped after its step-6 checkpoint: remove what came later.
  train.train_and_evaluate(cfg, tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '12')
  resumed = train.train_and_evaluate(cfg, tmp_path / 'b')
  assert int(resumed.step) == 12
  for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_predict_command_line_with_tta_ensemble_and_activations(trained, tiny_dataset,
                                                                tmp_path):
  cfg, workdir, _ = trained
  root = Path(__file__).resolve().parents[1]
  single = tiny_dataset / 'Singapore' / '1' / 'pre' / 'FLAIR.nii.gz'
  r = subprocess.run(
      [sys.executable, str(root / 'launch.py'), '--config=' + str(root / 'configs' / 'test.py'),
       '--mode=predict', f'--workdir={workdir}', f'--input={tiny_dataset / "Utrecht"}',
       f'--input={single}', f'--output={tmp_path / "out"}', '--config.predict.tta=True',
       f'--config.predict.ensemble=("{workdir}",)', '--config.predict.activations=True'],
      capture_output=True, text=True, cwd=root, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith('predict ')]
  assert len(lines) == 4 and 'lesion volume' in lines[0] and 'Dice' in lines[0]
  # Utrecht's subjects have brain.nii.gz beside wmh.nii.gz: scored; the bare file not.
  assert all('brain volume' in l for l in lines)
  assert [('brain Dice' in l) for l in lines] == [True, True, True, False]
  for name in ('0', '1', '2', 'FLAIR'):
    out = nib.load(str(tmp_path / 'out' / f'{name}_wmh.nii.gz'))
    ref = nib.load(str(single))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    brain = nib.load(str(tmp_path / 'out' / f'{name}_brain.nii.gz'))
    assert brain.shape == ref.shape and np.allclose(brain.affine, ref.affine)
    assert brain.get_data_dtype() == np.uint8
    brain = np.asarray(brain.dataobj)
    assert set(np.unique(brain)) == {0, 1}
    assert not (np.asarray(out.dataobj).astype(bool) & (brain == 0)).any()
    assert (tmp_path / 'out' / f'{name}_overlay.png').exists()
    assert (tmp_path / 'out' / f'{name}_activations.png').stat().st_size > 5000
  # OUT/volumes.csv: the printed figures, one row a scan; Dice where there is truth.
  with open(tmp_path / 'out' / 'volumes.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == ['0', '1', '2', 'FLAIR']
  for line, row in zip(lines, rows):
    assert f'{float(row["lesion_volume_ml"]):.2f} mL, {row["lesion_count"]} lesions' in line
    if row['dice']:
      assert f', Dice {float(row["dice"]):.3f}' in line
  assert rows[3]['dice'] == '' and float(rows[3]['brain_volume_ml']) > 0


def test_predict_with_the_other_head_says_which_model_brain_output(trained, tiny_dataset,
                                                                   tmp_path):
  cfg, workdir, _ = trained
  cfg = cfg.copy_and_resolve_references()
  cfg.model.brain_output = False       # the run was trained with a brain output
  with pytest.raises(ValueError, match='trained with model.brain_output=True') as e:
    predict.predict(cfg, workdir, [str(tiny_dataset / 'Utrecht')], tmp_path / 'out')
  assert '\n' not in str(e.value) and 'stored shape' in str(e.value)
  assert not list((tmp_path / 'out').glob('*.nii.gz'))


def test_predict_with_another_width_names_the_config_not_brain_output(trained,
                                                                      tiny_dataset,
                                                                      tmp_path):
  cfg, workdir, _ = trained
  cfg = cfg.copy_and_resolve_references()
  cfg.model.decoder_filters = tuple(2 * f for f in cfg.model.decoder_filters)
  with pytest.raises(ValueError, match='trained with another network') as e:
    predict.predict(cfg, workdir, [str(tiny_dataset / 'Utrecht')], tmp_path / 'out')
  assert '\n' not in str(e.value) and 'stored shape' in str(e.value)
  assert 'configs/seed_width.py' in str(e.value) and 'brain_output' not in str(e.value)
  assert not list((tmp_path / 'out').glob('*.nii.gz'))


def test_another_seed_changes_the_initial_weights_not_the_split(tiny_dataset):
  from wmh_jax import data  # pylint: disable=g-import-not-at-top
  from wmh_jax import models  # pylint: disable=g-import-not-at-top
  from wmh_jax import steps  # pylint: disable=g-import-not-at-top
  splits, params = [], []
  for seed in (0, 1):
    cfg = test_config.for_dataset(tiny_dataset)
    cfg.seed = seed                     # data.split_seed stays 0
    _, split = data.load_run_data(cfg, '/nonexistent', ())
    splits.append(split)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
    state = steps.create_train_state(cfg, init_rng, models.create_model(cfg.model),
                                     steps.create_optimizer(cfg.train))
    params.append(jax.tree.leaves(state.params))
  assert splits[0] == splits[1] and splits[0]['val']
  assert any(not np.array_equal(a, b) for a, b in zip(*params))
  cfg.data.split_seed = 1              # the split's own seed moves subjects
  _, split = data.load_run_data(cfg, '/nonexistent', ())
  assert [e['key'] for e in split['val']] != [e['key'] for e in splits[0]['val']]


def _refiner_spread():
  spec = importlib.util.spec_from_file_location(
      'refiner_spread', Path(__file__).resolve().parents[1] / 'bench' / 'refiner_spread.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_refiner_spread_refits_the_runs_own_refiner_and_others(trained,
                                                                tiny_dataset):
  """bench/refiner_spread.py: rotation 0 with the run's seed refits the refiner
  training saved and scores the validation subjects as evaluate does, from the
  prepared split or from their files; another rotation or seed fits another
  refiner."""
  spread = _refiner_spread()
  cfg, workdir, _ = trained
  train_set, val_set = data.load_splits(cfg, workdir)
  assert [p['key'] for p in spread.rotated(train_set, 1)] == (
      [p['key'] for p in train_set[1:] + train_set[:1]])
  model, state = checkpoints.restore_weights(cfg, workdir)
  results = list(spread.spread(cfg, train_set, model, state,
                               spread.split_scans(val_set), (0, 1),
                               (cfg.seed, cfg.seed + 1)))
  assert [(k, s) for k, s, _, _ in results] == [
      (0, cfg.seed), (0, cfg.seed + 1), (1, cfg.seed), (1, cfg.seed + 1)]
  saved = refine.load(workdir, int(state.step))
  own = results[0][2]
  assert float(own['threshold']) == float(saved['threshold'])
  for a, b in zip(jax.tree_util.tree_leaves(own['params']),
                  jax.tree_util.tree_leaves(saved['params'])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  segmenter = inference.load(cfg, workdir)   # the saved refiner, as evaluate
  rows = results[0][3]
  assert [r['subject'] for r in rows] == [p['key'] for p in val_set]
  for r, (_, scan, p) in zip(rows, spread.split_scans(val_set)):
    want = evaluate.case_row(p, inference.segment(segmenter, scan).mask)
    for m in challenge_metrics.METRICS:
      assert r[m] == pytest.approx(want[m], abs=1e-9, nan_ok=True)
  files = {key: (key, scan, labels)
           for key, scan, labels in spread.folder_scans(tiny_dataset, cfg)}
  from_files = spread.score(segmenter, spread.unrefined(
      segmenter, [files[p['key']] for p in val_set]))
  for a, b in zip(from_files, rows):
    for m in ('dice', 'lesion_f1', 'avd_percent'):
      assert a[m] == pytest.approx(b[m], abs=1e-9, nan_ok=True)
  # Another refiner setting (--set): the same MLPs, its own threshold.
  fixed = spread.with_refine_settings(cfg, ['refine.thresholds=(0.45,)'])
  assert tuple(cfg.refine.thresholds) != (0.45,)
  (_, _, only, _), = spread.spread(fixed, train_set, model, state,
                                   spread.split_scans(val_set), (0,), (cfg.seed,))
  assert float(only['threshold']) == pytest.approx(0.45)
  for a, b in zip(jax.tree_util.tree_leaves(only['params']),
                  jax.tree_util.tree_leaves(own['params'])):
    np.testing.assert_array_equal(a, b)
  # A fine-tune's refits blend in its prior (train.prior_refiner), as it did: the
  # same MLPs, the prior kept beside them.
  blend = spread.with_refine_settings(cfg, ['refine.prior_weight=0.5'])
  (_, _, mixed, _), = spread.spread(blend, train_set, model, state,
                                    spread.split_scans(val_set), (0,), (cfg.seed,),
                                    prior=saved)
  assert float(mixed['prior_weight']) == 0.5
  for a, b in zip(jax.tree_util.tree_leaves(mixed['prior']['params']),
                  jax.tree_util.tree_leaves(saved['params'])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(mixed['params']),
                  jax.tree_util.tree_leaves(own['params'])):
    np.testing.assert_array_equal(a, b)
  for _, _, other, _ in results[1:]:  # other draws, other shares: other MLPs
    leaves = zip(jax.tree_util.tree_leaves(other['params']),
                 jax.tree_util.tree_leaves(own['params']))
    assert max(float(np.abs(a - b).max()) for a, b in leaves) > 1e-3
  text = spread.table(results)
  assert len(text.splitlines()) == 1 + len(results) + 3
  assert text.splitlines()[-3].split()[0] == 'mean'


def test_refiner_spread_sets_only_refine_keys_the_config_has():
  """bench/refiner_spread.py --set: refine.KEY=VALUE literals, applied to a
  copy; anything else is refused in one line naming the setting."""
  spread = _refiner_spread()
  cfg = test_config.get_config()
  out = spread.with_refine_settings(
      cfg, ['refine.thresholds=(0.5, 0.6)', 'refine.num_steps=7'])
  assert tuple(out.refine.thresholds) == (0.5, 0.6) and out.refine.num_steps == 7
  assert tuple(cfg.refine.thresholds) != (0.5, 0.6)   # the run's config untouched
  # A key of the default's refine block that a run made before it lacks.
  old = cfg.copy_and_resolve_references()
  with old.unlocked():
    del old.refine['threshold_rule']
  assert 'threshold_rule' not in old.refine
  out = spread.with_refine_settings(old, ["refine.threshold_rule='best'"])
  assert out.refine.threshold_rule == 'best'
  for bad in ('model.norm=1', 'refine.no_such_key=1', 'refine.num_steps',
              'refine.thresholds=oops', 'refine.num_steps="many"',
              "refine.threshold_rule='nope'", "refine.min_lesion_rule='nope'"):
    with pytest.raises(ValueError, match='--set=|_rule') as e:
      spread.with_refine_settings(cfg, [bad])
    assert '\n' not in str(e.value)
    assert bad in str(e.value) or "'nope'" in str(e.value)


@pytest.mark.parametrize('script, bad_flag, message', [
    ('refiner_spread.py', '--seeds=one', 'error: --seeds and --rotations take integers'),
    ('lesion_misses.py', '--sizes=small', 'error: --sizes and --levels take numbers')])
def test_bench_scripts_refuse_a_folder_that_is_not_a_run(tmp_path, script, bad_flag,
                                                          message):
  """bench/refiner_spread.py and bench/lesion_misses.py, run from another
  folder, on a folder without config.json: exit status 1 and one line naming
  the file, before anything is loaded; a bad flag value: one line too."""
  path = Path(__file__).resolve().parents[1] / 'bench' / script
  done = subprocess.run([sys.executable, str(path), f'--workdir={tmp_path}'],
                        capture_output=True, text=True, timeout=300, check=False,
                        cwd=tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "config.json"}: no such file (not a trained run, or '
      'one made before config.json)')
  bad = subprocess.run([sys.executable, str(path), f'--workdir={tmp_path}', bad_flag],
                       capture_output=True, text=True, timeout=300, check=False,
                       cwd=tmp_path)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(message)


def test_validation_dice_takes_the_lesion_from_the_brain_normalised_input():
  """With ``image_brain`` (data.input_norm='brain') the lesion comes from it and
  the brain from ``image``, as inference's two passes; without it, one pass."""
  cfg = test_config.get_config()
  shape = (8, 8, 4)
  labels = np.zeros(shape, np.uint8)
  labels[2:5, 2:5, 1:3] = 1
  brain = np.zeros(shape, np.float32)
  brain[1:7, 1:7, :] = 1.0
  lesion_here = np.where(labels == 1, 1.0, -1.0).astype(np.float32)
  elsewhere = np.roll(lesion_here, 3, axis=0)
  # A stand-in network: lesion logit 10 x the input, brain logit 10 everywhere.
  def predict_fn(params, batch_stats, x):
    del params, batch_stats
    x = np.asarray(x)[..., 0]
    return np.stack([10 * x, np.full_like(x, 10.0)], -1)
  state = NoWeights()
  one = {'image': elsewhere[None], 'labels': labels[None], 'brain': brain[None],
         'has_brain': np.ones(1, np.float32)}
  two = {**one, 'image_brain': lesion_here[None]}
  assert train.validation_dice(predict_fn, state, one, cfg, True)['val/dice_grid'] < 0.5
  assert train.validation_dice(predict_fn, state, two, cfg, True)['val/dice_grid'] == 1.0
  # The brain comes from 'image': a brain logit that differs between the inputs.
  def brain_from_input(params, batch_stats, x):
    del params, batch_stats
    x = np.asarray(x)[..., 0]
    return np.stack([10 * x, np.where(x > 0, 10.0, -10.0)], -1)
  from_first = train.validation_dice(brain_from_input, state,
                                     {**two, 'image': lesion_here[None]}, cfg, True)
  from_other = train.validation_dice(brain_from_input, state, two, cfg, True)
  assert from_first['val/brain_dice_grid'] != from_other['val/brain_dice_grid']


def test_lesion_misses_finds_what_evaluate_counts_as_detected(trained):
  """bench/lesion_misses.py on a trained run's validation subjects: the share
  of each subject's true lesions it calls found is evaluate's lesion recall;
  a lesion has no candidate exactly when the refiner's own features pick none
  of its voxels; and with no smallest lesion the ones dropped as small are
  found, the others keep their fate."""
  from bench import lesion_misses as misses  # pylint: disable=g-import-not-at-top
  cfg, workdir, _ = trained
  _, val_set = data.load_splits(cfg, workdir)
  segmenter = inference.load(cfg, workdir)
  assert segmenter.refiner is not None
  keep_all = dataclasses.replace(
      segmenter, refiner={**segmenter.refiner, 'min_lesion_mm3': np.float64(0.0),
                          'min_lesion_mm2': np.float64(0.0)})
  checked = 0
  for key, scan, p in _refiner_spread().split_scans(val_set):
    rows = misses.scan_fates(segmenter, [(key, scan, p)])
    if not rows:
      continue
    checked += 1
    want = evaluate.case_row(p, inference.segment(segmenter, scan).mask)
    assert np.mean([f == 'found' for _, f, _ in rows]) == pytest.approx(
        want['lesion_recall'], abs=1e-9)
    before = inference.segment(segmenter, scan, before_refine=True)
    cand, _ = refine.features(before.unet_probability, before.flair_z,
                              scan.spacing, segmenter.candidate)
    lesions, n = challenge_metrics.lesions(p['native_labels'] == 1)
    decided = [bool(cand[lesions == i].any()) for i in range(1, n + 1)]
    assert [f != 'no_candidate' for _, f, _ in rows] == decided
    again = misses.scan_fates(keep_all, [(key, scan, p)])
    assert [f for _, f, _ in again] == [
        'found' if f == 'dropped_small' else f for _, f, _ in rows]
  assert checked
