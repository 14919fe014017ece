"""Fine-tuning (train.init_from), named held-out subjects (data.val_ids) and the
leave-one-out script's table, on tiny real files."""

import csv
import importlib.util
import json
import logging
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import test as test_config
from wmh_jax import checkpoints
from wmh_jax import data
from wmh_jax import evaluate
from wmh_jax import models
from wmh_jax import refine
from wmh_jax import steps
from wmh_jax import subjects
from wmh_jax import train

ROOT = Path(__file__).resolve().parents[1]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def source(tiny_dataset, tmp_path_factory):
  """``(workdir, final state)`` of a short run to fine-tune from (no refiner)."""
  workdir = tmp_path_factory.mktemp('source')
  cfg = test_config.for_dataset(tiny_dataset, num_steps=6)
  cfg.refine.enabled = False
  return workdir, train.train_and_evaluate(cfg, workdir)


def _fresh_state(cfg, seed):
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.train)
  return steps.create_train_state(cfg, jax.random.PRNGKey(seed), model, tx), tx


def test_initialise_from_takes_the_weights_step_0_fresh_optimizer(source, caplog):
  src_dir, src_state = source
  cfg = test_config.get_config()
  fresh, tx = _fresh_state(cfg, seed=1)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(_leaves(fresh.params), _leaves(src_state.params)))
  with caplog.at_level(logging.INFO, logger='absl'):
    state = checkpoints.initialise_from(str(src_dir), fresh, tx)
  assert f'Initialised from {src_dir} step 6' in caplog.text
  assert int(state.step) == 0
  assert jax.tree.structure(state.params) == jax.tree.structure(src_state.params)
  for a, b in zip(_leaves(state.params), _leaves(src_state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(state.opt_state), _leaves(tx.init(state.params))):
    np.testing.assert_array_equal(a, b)  # Adam's moments and count at zero
  assert not any(np.abs(a).max() > 0 for a in _leaves(state.opt_state))


def test_finetune_run_starts_from_source_holds_out_val_ids_and_resumes(
    source, tiny_dataset, tmp_path):
  src_dir, src_state = source
  # One step at a learning rate so small that Adam moves no weight by more than
  # ~1e-9: the run's weights are the source's, not a new initialisation.
  cfg = test_config.for_dataset(tiny_dataset, num_steps=1, learning_rate=1e-9,
                                init_from=str(src_dir))
  cfg.seed = 1
  cfg.data.val_ids = ('Utrecht/1',)
  state = train.train_and_evaluate(cfg, tmp_path)
  assert int(state.step) == 1
  for a, b in zip(_leaves(state.params), _leaves(src_state.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # The refiner (when the tiny source gives it candidates) and evaluate work as
  # for any run; the held-out subject is exactly the named one.
  summary = evaluate.evaluate(cfg, tmp_path)
  assert summary['step'] == 1
  rows = list(csv.DictReader(open(tmp_path / 'eval' / 'metrics.csv')))
  assert [r['subject'] for r in rows] == ['Utrecht/1']
  # A workdir that has a checkpoint resumes; init_from is ignored.
  cfg.train.init_from = str(tmp_path / 'not_there')
  again = train.train_and_evaluate(cfg, tmp_path)
  assert int(again.step) == 1


def test_prior_weight_blends_the_source_refiner_or_is_refused_before_training(
    source, tiny_dataset, tmp_path):
  """refine.prior_weight: the fine-tune's refiner holds the refiner of
  train.init_from's latest checkpoint at that weight; without one to blend in,
  or without init_from, the run is refused before its first step."""
  src_dir, _ = source
  cfg = test_config.for_dataset(tiny_dataset, num_steps=1, learning_rate=1e-9,
                                init_from=str(src_dir))
  cfg.data.val_ids = ('Utrecht/1',)
  cfg.refine.prior_weight = 0.5
  with pytest.raises(FileNotFoundError, match=(
      rf'train.init_from={src_dir}: no refiner to blend in at refine.prior_weight=0.5 '
      rf'\({src_dir}/refine/step_6 is missing')):
    train.train_and_evaluate(cfg, tmp_path / 'a')
  assert not (tmp_path / 'a' / 'checkpoints').exists()
  cfg.train.init_from = ''
  with pytest.raises(ValueError, match='train.init_from, which is not set'):
    train.train_and_evaluate(cfg, tmp_path / 'a')
  # The source with a refiner for its step 6 (fitted on a toy scan: all the
  # fine-tune needs is one with its candidate level).
  with_refiner = tmp_path / 'source'
  shutil.copytree(src_dir, with_refiner)
  rng = np.random.default_rng(0)
  prob = rng.uniform(0, 1, (16, 16, 6)).astype(np.float32)
  labels = (prob > 0.7).astype(np.uint8)
  image = (prob + rng.normal(0, 0.3, prob.shape)).astype(np.float32)
  alone = cfg.refine.copy_and_resolve_references()
  alone.prior_weight = 0.0
  prior = refine.fit([(prob, image, (1.0, 1.0, 3.0), labels)], alone, 0, 6)
  refine.save(with_refiner, prior)
  cfg.train.init_from = str(with_refiner)
  train.train_and_evaluate(cfg, tmp_path / 'b')
  got = refine.load(tmp_path / 'b', 1)
  assert got is not None and float(got['prior_weight']) == 0.5
  for a, b in zip(jax.tree.leaves(got['prior']['params']), jax.tree.leaves(prior['params'])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got['prior']['mean'], prior['mean'])
  assert int(got['prior']['unet_step']) == 6 and 'prior' not in got['prior']
  # Resumed with its refiner there, the run needs the source no more.
  shutil.rmtree(with_refiner)
  assert int(train.train_and_evaluate(cfg, tmp_path / 'b').step) == 1


def test_init_from_another_architecture_is_one_error_line(source, tiny_dataset,
                                                          tmp_path):
  src_dir, _ = source
  r = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), f'--config={ROOT / "configs" / "test.py"}',
       '--mode=train', f'--workdir={tmp_path / "w"}',
       f'--config.data.root={tiny_dataset}', '--config.data.synthetic=False',
       f'--config.train.init_from={src_dir}', '--config.model.decoder_filters=(4,12)'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, r.stderr[-3000:]
  assert errors[0].startswith(f'error: train.init_from={src_dir}: its checkpoint '
                              '(step 6) is another architecture: params/')
  assert ' there, (' in errors[0] and ') here' in errors[0]
  assert not list((tmp_path / 'w' / 'checkpoints').glob('[0-9]*'))


def test_init_from_takes_the_network_of_the_source_run(source, tiny_dataset, tmp_path):
  """A config file with another network (a fine-tune config written for another
  run) trains the source's network: model.* and data.grid come from its
  config.json, the rest from the file."""
  src_dir, src_state = source
  other = tmp_path / 'other.py'
  other.write_text('from configs import test\n\n\ndef get_config():\n'
                   '  c = test.get_config()\n  c.model.decoder_filters = (4, 12)\n'
                   '  c.train.num_steps = 1\n  c.refine.enabled = False\n  return c\n')
  w = tmp_path / 'w'
  r = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), f'--config={other}', '--mode=train',
       f'--workdir={w}', f'--config.data.root={tiny_dataset}',
       '--config.data.synthetic=False', f'--config.train.init_from={src_dir}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  saved = json.loads((w / 'config.json').read_text())
  trained = json.loads((src_dir / 'config.json').read_text())
  assert saved['model'] == trained['model'] and saved['data']['grid'] == trained['data']['grid']
  assert saved['model']['decoder_filters'] != [4, 12]
  assert saved['train']['num_steps'] == 1    # the file's own, not the source's
  assert f'train.init_from={src_dir}: the network as trained there: ' \
         f'model.decoder_filters={tuple(trained["model"]["decoder_filters"])!r}' in r.stderr


def test_init_from_batch_norm_run_names_the_missing_parameter(source):
  src_dir, _ = source
  cfg = test_config.get_config()
  cfg.model.norm = 'batch'
  fresh, tx = _fresh_state(cfg, seed=0)
  with pytest.raises(ValueError, match=r'(params|batch_stats)/\S+ \(\d+,\) is not in it') as e:
    checkpoints.initialise_from(str(src_dir), fresh, tx)
  assert '\n' not in str(e.value)


def test_init_from_without_checkpoint_is_refused(tmp_path):
  cfg = test_config.get_config()
  fresh, tx = _fresh_state(cfg, seed=0)
  with pytest.raises(FileNotFoundError, match=f'train.init_from={tmp_path / "no"}: '
                     'no checkpoint'):
    checkpoints.initialise_from(str(tmp_path / 'no'), fresh, tx)
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='empty: no checkpoint'):
    checkpoints.initialise_from(str(tmp_path / 'empty'), fresh, tx)


def test_split_by_ids_holds_out_exactly_the_named_subjects(tiny_dataset):
  found = subjects.find_subjects(tiny_dataset)
  train_s, val = subjects.split_by_ids(found, ('Utrecht/1', 'Amsterdam/GE3T/0'))
  assert [s.key for s in val] == ['Amsterdam/GE3T/0', 'Utrecht/1']
  assert len(train_s) == 7 and not {s.key for s in train_s} & {s.key for s in val}
  with pytest.raises(ValueError, match=r'^data.val_ids: no subject Leiden/7 '
                     r'\(ids found: Amsterdam/GE3T/0, .*Utrecht/2\)$'):
    subjects.split_by_ids(found, ('Leiden/7',))
  with pytest.raises(ValueError, match='1 names 3 subjects .*give SITE/ID'):
    subjects.split_by_ids(found, ('1',))  # IDs repeat across the tiny sites
  items = [{'key': 'A/10'}, {'key': 'A/11'}, {'key': 'B/12'}]
  t, v = subjects.split_by_ids(items, ('12',), lambda d: d['key'])
  assert v == [{'key': 'B/12'}] and len(t) == 2  # a unique bare ID is enough
  with pytest.raises(ValueError, match='none left to train on'):
    subjects.split_by_ids(items, ('10', '11', '12'), lambda d: d['key'])


def test_load_splits_val_ids_conflicts_are_refused(tiny_dataset, tmp_path):
  cfg = test_config.for_dataset(tiny_dataset)
  cfg.data.val_ids = ('Utrecht/1',)
  cfg.data.val_root = str(tiny_dataset)
  with pytest.raises(ValueError, match="val_root=''"):
    data.load_splits(cfg, tmp_path)
  cfg.data.val_root = ''
  cfg.data.val_sites = ('Utrecht',)
  with pytest.raises(ValueError, match='give one of them'):
    data.load_splits(cfg, tmp_path)
  cfg = finetune_config.get_config()  # data.root must be given
  with pytest.raises(ValueError, match='data.root is empty'):
    data.load_splits(cfg, tmp_path)


def _leave_one_out():
  spec = importlib.util.spec_from_file_location('leave_one_out',
                                                ROOT / 'bench' / 'leave_one_out.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_leave_one_out_table_and_csv(tmp_path):
  loo = _leave_one_out()
  fields = ['subject', 'dice', 'hd95_mm', 'avd_percent', 'lesion_recall', 'lesion_f1',
            'dice_unet', 'true_volume_ml', 'pred_volume_ml']
  results = {'fold_a': ['S/a', '0.6', '10', '20', '0.5', '0.4', '0.5', '3', '2.5'],
             'fold_b': ['S/b', '0.8', 'nan', '40', '0.7', '0.6', '0.7', '5', '4']}
  for fold, row in results.items():
    (tmp_path / fold / 'eval').mkdir(parents=True)
    with open(tmp_path / fold / 'eval' / 'metrics.csv', 'w', newline='') as f:
      csv.writer(f).writerows([fields, row])
  folds = {'S/a': 'fold_a', 'S/b': 'fold_b', 'S/c': 'fold_c'}  # c: not run yet
  rows = loo.collect(tmp_path, folds)
  assert [(r['fold'], r['subject']) for r in rows] == [('fold_a', 'S/a'),
                                                       ('fold_b', 'S/b')]
  m = loo.means(rows)
  assert m['dice'] == pytest.approx(0.7) and m['hd95_mm'] == pytest.approx(10)
  assert m['avd_percent'] == pytest.approx(30) and m['lesion_f1'] == pytest.approx(0.5)
  text = loo.table(rows).splitlines()
  assert len(text) == 4 and text[0].split()[:3] == ['fold', 'subject', 'dice']
  assert text[3].startswith('mean') and '0.7' in text[3]
  out = list(csv.DictReader(open(loo.write_summary(tmp_path, rows))))
  assert [r['fold'] for r in out] == ['fold_a', 'fold_b', 'mean']
  assert float(out[2]['dice']) == pytest.approx(0.7)
  assert math.isnan(float(out[1]['hd95_mm']))


def test_leave_one_out_folds_and_command(tiny_dataset, tmp_path):
  loo = _leave_one_out()
  found = subjects.find_subjects(tiny_dataset)
  names = loo.fold_names(found)
  assert names['Amsterdam/GE3T/0'] == 'fold_Amsterdam_GE3T_0'  # IDs repeat here
  unique = [types.SimpleNamespace(id=f'{i}', key=f'A/{i}') for i in (7, 8)]
  assert loo.fold_names(unique) == {'A/7': 'fold_7', 'A/8': 'fold_8'}
  cmd = loo.fold_command('c.py', tmp_path / 'fold_7', tiny_dataset, 'A/7', '',
                         ['--config.train.num_steps=5'])
  assert '--config.data.val_ids=("A/7",)' in cmd and cmd[-1] == '--config.train.num_steps=5'
  assert not any('init_from' in a for a in cmd)
  cmd = loo.fold_command('c.py', tmp_path, tiny_dataset, 'A/7', '/runs/x', [])
  assert '--config.train.init_from=/runs/x' in cmd


def test_finetune_averages_left_right_flips_where_the_default_does_not():
  # The refiner's fit, evaluate and predict all take predict.tta (train_test
  # checks that the fit sees the flip-averaged probability).
  from configs import default  # pylint: disable=import-outside-toplevel
  tuned, base = finetune_config.get_config().predict, default.get_config().predict
  assert tuned.tta and not base.tta and tuned.tta_axes == base.tta_axes == (0,)
  assert {k: v for k, v in tuned.items() if k != 'tta'} == {
      k: v for k, v in base.items() if k != 'tta'}
