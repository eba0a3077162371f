"""benchmarks/training_curve.py: a run's curve and its numbers from its events.

A run's scalars are written with the training's own writer; the command must
report exactly those evaluations and draw a PNG.
"""

from __future__ import annotations

import json

from PIL import Image

from cips_jax import summary
import support


def test_the_curve_command_reports_the_written_evaluations(tmp_path):
  with summary.MetricWriter(tmp_path / 'tensorboard') as writer:
    for step in range(100, 1100, 100):
      writer.write_scalars(step, {'d_loss': step / 1024, 'g_loss': 2.0})
    writer.write_scalars(0, {'swd/swd_mean': 900.0})
    for step, fid, kid in ((500, 250.5, 0.25), (1000, 120.25, 0.125)):
      writer.write_scalars(step, {'eval/fid': fid, 'eval/kid': kid})
  out = tmp_path / 'curve.png'
  result = support.run_python(
    'benchmarks/training_curve.py',
    f'--workdir={tmp_path}',
    f'--out={out}',
    '--title=test run',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report['evaluations'] == [
    {'step': 500, 'fid': 250.5, 'kid': 0.25},
    {'step': 1000, 'fid': 120.25, 'kid': 0.125},
  ]
  assert report['swd_mean'] == [{'step': 0, 'swd_mean': 900.0}]
  assert report['last_losses']['d_loss'] == [1000, 1000 / 1024]
  assert report['last_losses']['g_loss'] == [1000, 2.0]
  with Image.open(out) as picture:
    assert picture.size == (640, 420)
