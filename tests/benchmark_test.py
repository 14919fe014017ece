"""Benchmark mode: one honest JSON record per setting, on a tiny grid."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from configs import test as test_config
from wmh_jax import benchmark
from wmh_jax import machine


def test_benchmark_records_every_setting_and_the_pipeline(capsys):
  cfg = test_config.get_config()
  cfg.benchmark.conv_impls = ('native', 'winograd')
  cfg.benchmark.steps = 3
  cfg.benchmark.warmup = 1
  records = benchmark.benchmark(cfg)
  printed = [json.loads(l) for l in capsys.readouterr().out.splitlines()
             if l.startswith('{')]
  assert printed == records
  steps_, pipe = records[:2], records[2]
  assert [r['conv_impl'] for r in steps_] == ['native', 'winograd']
  for r in steps_:
    assert r['steps_timed'] == 3 and r['grid'] == [32, 32, 8] and r['batch'] == 1
    assert r['xla_flags'] == os.environ.get('XLA_FLAGS', '')  # what the step ran under
    assert r['tf_enable_onednn_opts'] == os.environ.get('TF_ENABLE_ONEDNN_OPTS', '')
    assert 0 < r['step_min_s'] <= r['step_median_s'] <= r['step_max_s']
    assert r['flops_per_step'] > 0 and r['peak_matmul_flops_per_s'] > 0
    achieved = r['flops_per_step'] / r['step_median_s']
    assert r['achieved_flops_per_s'] == pytest.approx(achieved, rel=1e-3)
    assert r['fraction_of_peak'] == pytest.approx(
        achieved / r['peak_matmul_flops_per_s'], rel=1e-2)
    assert r['voxels_per_s'] == pytest.approx(32 * 32 * 8 / r['step_median_s'], rel=1e-3)
    assert r['peak_host_rss_mib'] > 0 and r['inference_s_per_volume'] > 0
    assert r['direct_equivalent_flops_per_s'] == pytest.approx(
        r['flops_per_step_direct'] / r['step_median_s'], rel=1e-3)
  # Winograd and the sub-pixel up-convolutions do fewer FLOPs than direct ones,
  # and the record says so instead of passing them off as the same work.
  wino = steps_[1]
  assert wino['flops_per_step'] < 0.9 * wino['flops_per_step_direct']
  assert wino['direct_equivalent_fraction_of_peak'] > wino['fraction_of_peak']
  assert pipe['bench'] == 'input_pipeline' and pipe['batches_per_s'] > 0
  assert pipe['pipeline_over_step'] > 0
  for r in records:  # every line names the machine it was measured on
    assert r['cpu'] and r['cpu_cores'] >= 1 and isinstance(r['cpu_vector'], list)
    assert r['device'] == 'cpu'


def test_cpuinfo_names_the_model_and_the_vector_extensions():
  text = ('processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n'
          'flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n\n'
          'processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n')
  model, flags = machine._cpuinfo(text)  # pylint: disable=protected-access
  assert model == 'Intel(R) Xeon(R) Platinum 8480+'
  assert [f for f in machine.VECTOR_FLAGS if f in flags] == [
      'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16']


def test_pipeline_time_script_prints_cpu_seconds_a_crop(tmp_path):
  """bench/pipeline_time.py: the default config's crops on a small grid."""
  script = Path(__file__).resolve().parents[1] / 'bench' / 'pipeline_time.py'
  run = subprocess.run([sys.executable, str(script), '--grid=72,80,16', '--examples=3',
                        '--repeats=2'], cwd=tmp_path, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  rec = json.loads([l for l in run.stdout.splitlines() if l.startswith('{')][-1])
  assert rec['grid'] == [72, 80, 16] and rec['patch'] == [64, 64, None]
  assert rec['examples'] == 3 and len(rec['cpu_s_per_example_all']) == 2
  assert rec['cpu_s_per_example'] > 0 and rec['wall_s_per_example'] > 0
