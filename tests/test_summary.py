"""cips_jax.summary and cips_jax.images: event files read back, image grids,
PNGs, GIFs, plots, progress lines."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
from PIL import Image
import pytest

from cips_jax import images
from cips_jax import progress as progress_lib
from cips_jax import summary
from cips_jax.images import image_grid
from cips_jax.images import save_png
from cips_jax.progress import ProgressLogger
from cips_jax.summary import MetricWriter
from support import read_events
from support import summary_values


def test_writer_scalars_read_back(tmp_path):
  logdir = str(tmp_path / 'run')
  with MetricWriter(logdir) as writer:
    writer.write_scalars(1, {'d_loss': 1.5, 'g_loss': np.float32(0.25)})
    writer.write_scalars(7, {'d_loss': np.array(-2.0)})
    writer.flush()
  assert glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  scalars = {
    (step, v.tag): v.simple_value
    for step, v in summary_values(read_events(logdir))
    if v.WhichOneof('value') == 'simple_value'
  }
  assert scalars == {
    (1, 'd_loss'): 1.5,
    (1, 'g_loss'): 0.25,
    (7, 'd_loss'): -2.0,
  }


def test_read_scalars_gives_each_tag_its_curve(tmp_path):
  logdir = tmp_path / 'run'
  with MetricWriter(logdir) as writer:
    writer.write_scalars(2, {'d_loss': 1.5, 'eval/fid': 90.0})
    writer.write_scalars(1, {'d_loss': 2.5})
    writer.write_scalars(2, {'d_loss': 0.5})  # rewritten: the last one counts
    writer.write_images(2, {'samples': np.zeros((4, 4, 3), np.uint8)})
  assert summary.read_scalars(logdir) == {
    'd_loss': [(1, 2.5), (2, 0.5)],
    'eval/fid': [(2, 90.0)],
  }
  assert summary.read_scalars(tmp_path / 'empty') == {}


def test_training_report_averages_each_name_over_its_own_steps(tmp_path):
  logdir = str(tmp_path / 'run')
  with MetricWriter(logdir) as writer:
    report = summary.TrainingReport(writer, 10, 0, batch_size=4)
    report.add({'d_loss': np.float32(1.0), 'r1_penalty': np.float32(6.0)})
    report.add({'d_loss': np.float32(2.0)})
    report.add({'d_loss': np.float32(6.0)})
    report.write(3)
    report.write(3)  # nothing new since: writes nothing
    report.add({'d_loss': np.float32(np.nan)})
    with pytest.raises(FloatingPointError, match='d_loss'):
      report.write(4)
    writer.flush()
  scalars = {
    (step, v.tag): v.simple_value
    for step, v in summary_values(read_events(logdir))
    if v.WhichOneof('value') == 'simple_value'
  }
  # d_loss over its 3 steps, R1 over the one step that ran it; the diverged
  # step 4 wrote nothing.
  assert scalars[(3, 'd_loss')] == 3.0
  assert scalars[(3, 'r1_penalty')] == 6.0
  assert scalars[(3, 'images_per_s')] == 4 * scalars[(3, 'steps_per_s')]
  assert {step for step, _ in scalars} == {3}


def test_writer_images_and_hparams(tmp_path):
  logdir = str(tmp_path)
  rng = np.random.default_rng(0)
  single = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  batch = rng.uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32)
  writer = MetricWriter(logdir)
  writer.write_images(3, {'single': single, 'batch': batch})
  writer.write_hparams(
    {
      'lr': 2e-3,
      'model': {'size': 32, 'style_dim': 512},
      'betas': (0.0, 0.99),
      'name': 'cips',
      'ema': True,
      'seed': np.int64(3),
      'none': None,
    }
  )
  writer.close()
  # After close: a no-op, not an error.
  writer.write_scalars(9, {'ignored': 1.0})
  values = summary_values(read_events(logdir))
  images = {
    v.tag: (step, v.image)
    for step, v in values
    if v.WhichOneof('value') == 'image'
  }
  assert set(images) == {'single', 'batch'}
  step, image = images['single']
  assert step == 3 and (image.height, image.width) == (6, 5)
  np.testing.assert_array_equal(
    np.asarray(
      Image.open(io.BytesIO(image.encoded_image_string)).convert('RGB')
    ),
    single,
  )
  _, image = images['batch']
  assert (image.height, image.width) == image_grid(batch).shape[:2]
  tags = {v.tag for _, v in values}
  assert (
    '_hparams_/session_start_info' in tags and '_hparams_/experiment' in tags
  )
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

  start = next(v for _, v in values if v.tag == '_hparams_/session_start_info')
  data = HParamsPluginData.FromString(start.metadata.plugin_data.content)
  hp = data.session_start_info.hparams
  assert hp['lr'].number_value == pytest.approx(2e-3)
  assert hp['model.size'].number_value == 32
  assert hp['model.style_dim'].number_value == 512
  assert hp['betas'].string_value == '(0.0, 0.99)'
  assert hp['name'].string_value == 'cips'
  assert hp['ema'].bool_value is True
  assert hp['seed'].number_value == 3
  assert hp['none'].string_value == 'None'


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / 'never'
  writer = MetricWriter(logdir, enabled=False)
  writer.write_scalars(0, {'x': 1.0})
  writer.write_images(0, {'img': np.zeros((4, 4, 3), np.uint8)})
  writer.write_hparams({'a': 1})
  writer.flush()
  writer.close()
  assert not logdir.exists()
  assert list(tmp_path.iterdir()) == []


def test_image_grid_layout():
  images = np.stack(
    [np.full((4, 4, 3), 10 * (i + 1), np.uint8) for i in range(5)]
  )
  grid = image_grid(images, ncols=3)
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)  # 2 rows, 1-pixel borders
  for i in range(5):
    r, c = divmod(i, 3)
    cell = grid[1 + 5 * r : 5 + 5 * r, 1 + 5 * c : 5 + 5 * c]
    assert np.all(cell == 10 * (i + 1)), i
  assert (
    np.all(grid[0] == 0) and np.all(grid[:, 0] == 0) and np.all(grid[5] == 0)
  )
  assert np.all(grid[6:10, 11:15] == 0)  # the unused sixth cell
  # Default: ceil(sqrt(5)) = 3 columns; wider padding.
  assert image_grid(images).shape == (11, 16, 3)
  assert image_grid(images, ncols=5, padding=2).shape == (4 + 4, 5 * 6 + 2, 3)
  # One image, and grayscale batches.
  assert image_grid(images[0]).shape == (6, 6, 3)
  assert image_grid(np.zeros((2, 4, 4, 1), np.uint8), ncols=1).shape == (
    11,
    6,
    3,
  )


def test_image_grid_float_values_and_clamping():
  x = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0, np.nan], np.float32)
  images = np.broadcast_to(x[None, None, :, None], (1, 1, 7, 3))
  row = image_grid(images, padding=0)[0, :, 0]
  # floor(255 * (clip(x) + 1) / 2 + 0.5), as torchvision's save_image(normalize,
  # range=(-1, 1)).
  np.testing.assert_array_equal(row, [0, 0, 128, 191, 255, 255, 128])


def test_save_png_creates_dirs(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  path = tmp_path / 'a' / 'b' / 'img.png'
  assert save_png(path, image) == str(path)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  grid_path = save_png(
    tmp_path / 'grid.png', np.zeros((5, 4, 4, 3), np.float32)
  )
  assert np.asarray(Image.open(grid_path)).shape == (11, 16, 3)


class FakeClock:
  def __init__(self, t: float = 100.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


def test_progress_logger_rate_limits_and_formats():
  clock, lines = FakeClock(), []
  progress = ProgressLogger(
    10_000,
    start_step=1000,
    every_seconds=10,
    log_fn=lines.append,
    clock=clock,
    smoothing=1.0,
  )
  clock.t = 130.0  # compilation before the first step: not counted
  assert progress.update(1001, {'d_loss': 1.0}) is None
  for step in range(1002, 1051):  # 49 steps in 4.9 s: nothing logged
    clock.t = 130.0 + 0.1 * (step - 1001)
    assert progress.update(step) is None
  clock.t = 140.0  # 10 s after the first update, 200 steps later
  line = progress.update(
    1201, {'d_loss': 1.2341, 'g_loss': np.float32(0.98712)}
  )
  assert line is not None and lines == [line]
  # 200 steps / 10 s = 20 steps/s; (10000 - 1201) / 20 = 439.95 s -> 0:07:20.
  assert line == (
    'step 1201/10000 (12.0%)  20.00 steps/s  ETA 0:07:20  '
    'd_loss 1.234 g_loss 0.987'
  )
  clock.t = 149.9
  assert progress.update(1300) is None  # within 10 s of the last line
  clock.t = 150.0
  assert progress.update(1301) is not None
  assert len(lines) == 2
  clock.t = 150.5
  last = progress.update(10_000, {'d_loss': 0.5})  # the last step always logs
  assert last is not None and last.startswith('step 10000/10000 (100.0%)')
  assert 'ETA 0:00:00' in last and len(lines) == 3


def test_progress_logger_smoothing_and_eta():
  clock, lines = FakeClock(0.0), []
  progress = ProgressLogger(
    100_000, every_seconds=1, log_fn=lines.append, clock=clock, smoothing=0.5
  )
  progress.update(0)
  clock.t = 10.0
  progress.update(100)  # 10 steps/s
  assert progress.rate == pytest.approx(10.0)
  clock.t = 20.0
  progress.update(400)  # 30 steps/s measured -> 0.5 * 30 + 0.5 * 10 = 20
  assert progress.rate == pytest.approx(20.0)
  assert progress.eta_seconds(400) == pytest.approx((100_000 - 400) / 20.0)
  assert 'ETA 1:23:00' in lines[-1]  # 4980 s
  assert progress_lib.format_duration(2577) == '0:42:57'
  assert progress_lib.format_duration(90_061) == '1 day, 1:01:01'


def test_progress_logger_single_final_update():
  clock, lines = FakeClock(0.0), []
  progress = ProgressLogger(50, start_step=40, log_fn=lines.append, clock=clock)
  clock.t = 5.0
  line = progress.update(50)
  assert line == 'step 50/50 (100.0%)  2.00 steps/s  ETA 0:00:00' and lines == [
    line
  ]


def test_save_gif_writes_every_frame(tmp_path):
  from PIL import Image

  frames = np.stack(
    [np.full((6, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)]
  )
  path = images.save_gif(tmp_path / 'a' / 'walk.gif', frames, fps=10)
  with Image.open(path) as gif:
    assert gif.n_frames == 3 and gif.size == (5, 6)
    values = []
    for i in range(3):
      gif.seek(i)
      values.append(int(np.asarray(gif.convert('RGB'))[0, 0, 0]))
  assert values == [0, 128, 255]
  with Image.open(path) as gif:
    assert gif.info['loop'] == 0  # repeats forever
  once = images.save_gif(tmp_path / 'once.gif', frames, loop=False)
  with Image.open(once) as gif:
    assert 'loop' not in gif.info  # plays once (a count of 1 plays twice)
  with pytest.raises(ValueError, match='frames'):
    images.save_gif(tmp_path / 'b.gif', np.zeros((4, 4, 3)))


def test_progress_bar_draws_rate_and_eta():
  import io

  stream, now = io.StringIO(), [0.0]
  bar = progress_lib.ProgressBar(
    'rendering', stream=stream, width=10, clock=lambda: now[0]
  )
  now[0] = 2.0
  bar(500_000, 2_000_000)
  now[0] = 8.0
  bar(2_000_000, 2_000_000)
  lines = stream.getvalue().split('\r')[1:]
  assert lines[0] == (
    'rendering [##........]  25%  500.0k/2.0M pixels  250.0k/s  ETA 0:00:06'
  )
  assert (
    lines[1].startswith('rendering [##########] 100%  2.0M/2.0M pixels')
    and lines[1][-1] == '\n'
  )


def test_line_plot_draws_each_curve_in_its_colour(tmp_path):
  from PIL import Image

  x = np.linspace(0, 1, 20)
  path = images.save_line_plot(
    tmp_path / 'p.png', {'up': (x, 10**x), 'down': (x, 10**-x)}, log_y=True
  )
  with Image.open(path) as image:
    pixels = np.asarray(image.convert('RGB')).reshape(-1, 3)
  for colour in images.PLOT_COLOURS[:2]:
    assert np.sum(np.all(pixels == colour, axis=-1)) > 100
  with pytest.raises(ValueError, match='nothing to plot'):
    images.save_line_plot(tmp_path / 'q.png', {'neg': (x, -x)}, log_y=True)
