"""The accelerator check's smoke mode: the script that measures every GPU/TPU
target runs here, on a CPU, at tiny sizes, and writes every figure."""

from __future__ import annotations

import json
import subprocess

import support


def test_device_check_smoke_writes_every_figure(tmp_path):
  out = tmp_path / 'device_check.json'
  process = subprocess.run(
    ['bash', 'benchmarks/device_check.sh', '--smoke', f'--out={out}'],
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
    for form in ('activations', 'weights')
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
