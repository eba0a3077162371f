"""The accelerator check's smoke mode: the script that measures every GPU/TPU
target runs here, on a CPU, at tiny sizes, and writes every figure."""

from __future__ import annotations

import json
import subprocess

import pytest

import support

NO_BUDGET_S = 1e6


def test_device_check_smoke_writes_every_figure(tmp_path):
  out = tmp_path / 'device_check.json'
  process = subprocess.run(
    # The check's time budget is for a lent device; here no case may be
    # skipped for time, on any CPU.
    [
      'bash',
      'benchmarks/device_check.sh',
      '--smoke',
      f'--out={out}',
      f'--budget_s={NO_BUDGET_S}',
    ],
    cwd=support.REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['smoke'] and report['machine']['backend'] == 'cpu'
  assert set(report['matmul_tflop_per_s']) == {
    'bfloat16',
    'float32_default',
    'float32_highest',
  }
  cases = {(c['dtype'], c['form']) for c in report['generation_256']}
  assert cases == {
    (dtype, form)
    for dtype in ('bfloat16', 'float32')
    for form in ('activations', 'weights', 'fused')
  }
  assert set(report['style_ratios']) == {
    'mixture2_vs_per_image_time',
    'per_pixel_vs_per_image_time',
  }
  (step,) = report['train']
  assert step['seconds_amortised'] >= min(
    step['seconds_plain_step'], step['seconds_r1_step']
  )
  assert step['useful_tflop_per_step'] > 0
  projection = report['churches_projection']
  assert projection['gpu_days'] == round(
    projection['images'] / projection['images_per_s'] / 86400, 2
  )
  assert report['choices']['per_image_form_auto'] == 'activations'
  assert report['choices']['discriminator_conv'] == 'im2col'
  assert report['skipped'] == [] and report['budget_s'] == NO_BUDGET_S


def test_memory_plan_script_plans_every_device(tmp_path):
  out = tmp_path / 'memory_plan.json'
  result = support.run_python(
    'benchmarks/memory_plan.py', '--smoke', f'--out={out}', timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report['configs']
  assert row['config'] == 'quickstart' and row['devices'] == 1
  plain, remat = row['no_remat'], row['remat']
  assert remat['activations_mib'] < plain['activations_mib']  # remat saves
  for plan in (plain, remat):
    state = plan['parameters_mib'] + plan['optimizer_mib'] + plan['ema_mib']
    assert plan['total_mib'] == pytest.approx(
      state + plan['activations_mib'], abs=0.2
    )
    per_image = plan['activations_mib'] / plan['batch_per_device']
    for device, size in report['devices'].items():
      usable = size * report['usable_fraction'] / 2**20
      batch = plan['max_batch_per_device'][device]
      # The largest batch fits and one more would not (to the JSON's rounding).
      assert state + batch * per_image <= usable * 1.001
      assert state + (batch + 1) * per_image > usable * 0.999


def test_tracing_script_traces_both_ways(tmp_path):
  out = tmp_path / 'tracing.json'
  result = support.run_python(
    'benchmarks/tracing.py', '--smoke', '--repeats=1', f'--out={out}'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (case,) = json.loads(out.read_text())['cases'].values()
  for way in ('staged_seconds', 'pinned_seconds'):
    assert set(case[way]) == {'plain', 'r1'}
    assert all(seconds > 0 for seconds in case[way].values())
