"""What a training run writes for its user: TensorBoard events, image grids, progress lines.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_hparams(config)                         # nested dicts are flattened
    writer.write_scalars(step, {'d_loss': d, 'g_loss': g})
    writer.write_images(step, {'samples': image_grid(samples)})
    save_png(f'{workdir}/samples/{step:06d}.png', image_grid(samples))
    progress = ProgressLogger(total_steps, start_step)
    progress.update(step, {'d_loss': d, 'g_loss': g})    # logs at most every 10 s

Events go through tensorboardX, so nothing here needs TensorFlow.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
from absl import logging


def _flatten(tree: Mapping[str, Any], prefix: str = '', sep: str = '.') -> dict[str, Any]:
  """{'a': {'b': 1}, 'c': 2} -> {'a.b': 1, 'c': 2}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{sep}{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name, sep))
    else:
      flat[name] = value
  return flat


def _hparam_value(value: Any) -> bool | int | float | str:
  """A value TensorBoard's hparams plugin accepts: bool, int, float or str (else its str)."""
  if isinstance(value, np.generic) or (hasattr(value, 'dtype') and np.ndim(value) == 0):
    value = np.asarray(value).item()   # numpy / jax 0-d numbers
  if isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def to_uint8(images: Any) -> np.ndarray:
  """Float images in [-1, 1] (clamped) or uint8 -> uint8 in [0, 255], same shape.

  Floats map like torchvision's save_image(normalize=True, range=(-1, 1)):
  floor(255 * (clip(x, -1, 1) + 1) / 2 + 0.5); NaN becomes 0 (mid-grey).
  """
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  if x.dtype == np.bool_:
    return x.astype(np.uint8) * np.uint8(255)
  x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
  x = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5 + 0.5
  return np.clip(np.floor(x), 0, 255).astype(np.uint8)


def _as_rgb(x: np.ndarray) -> np.ndarray:
  """(..., H, W), (..., H, W, 1) or (..., H, W, 3) -> (..., H, W, 3)."""
  if x.shape[-1] not in (1, 3):
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def image_grid(images: Any, ncols: Optional[int] = None, padding: int = 1,
               pad_value: int = 0) -> np.ndarray:
  """Tiles a batch of images into one uint8 picture.

  Args:
    images: (N, H, W, 3) or (N, H, W, 1) batch (or one (H, W, 3) image), float in [-1, 1]
      (values outside are clamped) or uint8.
    ncols: images per row; default ceil(sqrt(N)). Rows = ceil(N / ncols); unused cells
      stay `pad_value`.
    padding: border in pixels around and between the images.
    pad_value: uint8 value of the border.

  Returns:
    uint8 array (rows * (H + padding) + padding, ncols * (W + padding) + padding, 3).
  """
  x = to_uint8(images)
  if x.ndim == 3 and x.shape[-1] in (1, 3):
    x = x[None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'expected images (N, H, W, 3) or (N, H, W, 1), got shape {x.shape}')
  x = _as_rgb(x)
  n, h, w, _ = x.shape
  if n == 0:
    raise ValueError('image_grid needs at least one image')
  ncols = int(ncols) if ncols else math.ceil(math.sqrt(n))
  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, 3),
                 pad_value, np.uint8)
  for i in range(n):
    r, c = divmod(i, ncols)
    top = padding + r * (h + padding)
    left = padding + c * (w + padding)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def save_png(path: str | os.PathLike, image: Any) -> str:
  """Writes an image as PNG, creating parent directories.

  Args:
    path: file to write.
    image: uint8 (H, W, 3), (H, W, 1) or (H, W); float images in [-1, 1] are converted
      as in `to_uint8`; a batch (N, H, W, C) is tiled with `image_grid` first.

  Returns:
    the path written, as a string.
  """
  from PIL import Image

  x = np.asarray(image)
  if x.ndim == 4:
    x = image_grid(x)
  x = to_uint8(x)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
    raise ValueError(f'expected an image (H, W, 3), got shape {x.shape}')
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(x).save(path, format='PNG')
  return path


def save_gif(path: str | os.PathLike, frames: Any, fps: float = 12.0, loop: bool = True) -> str:
  """Writes frames (T, H, W, 3), float in [-1, 1] or uint8, as an animated GIF."""
  from PIL import Image

  x = to_uint8(frames)
  if x.ndim != 4 or x.shape[-1] != 3 or len(x) < 1:
    raise ValueError(f'expected frames (T, H, W, 3), got shape {x.shape}')
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  images = [Image.fromarray(frame) for frame in x]
  images[0].save(path, format='GIF', save_all=True, append_images=images[1:],
                 duration=int(round(1000 / fps)), loop=0 if loop else 1)
  return path


_PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def save_line_plot(path: str | os.PathLike, curves: Mapping[str, tuple[Any, Any]],
                   x_label: str = '', y_label: str = '', log_y: bool = False, title: str = '',
                   size: tuple[int, int] = (640, 420)) -> str:
  """A small PNG line plot (no plotting library): curves {name: (x (N,), y (N,))}."""
  from PIL import Image, ImageDraw

  if not curves:
    raise ValueError('save_line_plot needs at least one curve')
  prepared = {}
  for name, (x, y) in curves.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if log_y:
      keep = y > 0
      x, y = x[keep], np.log10(y[keep])
    prepared[name] = (x, y)
  xs = np.concatenate([x for x, _ in prepared.values()])
  ys = np.concatenate([y for _, y in prepared.values()])
  if not len(xs):
    raise ValueError('nothing to plot (no positive values on a log scale?)')
  x_lo, x_hi = float(xs.min()), float(xs.max()) or 1.0
  y_lo, y_hi = float(ys.min()), float(ys.max())
  if y_hi == y_lo:
    y_lo, y_hi = y_lo - 1, y_hi + 1
  width, height = size
  left, right, top, bottom = 70, 20, 30, 50
  image = Image.new('RGB', size, (255, 255, 255))
  draw = ImageDraw.Draw(image)

  def to_pixel(x, y):
    px = left + (x - x_lo) / max(x_hi - x_lo, 1e-12) * (width - left - right)
    py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
    return float(px), float(py)

  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  for i in range(5):   # axis ticks with their values
    fraction = i / 4
    xv, yv = x_lo + fraction * (x_hi - x_lo), y_lo + fraction * (y_hi - y_lo)
    px, _ = to_pixel(xv, y_lo)
    _, py = to_pixel(x_lo, yv)
    draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
    draw.text((px - 12, height - bottom + 6), f'{xv:.3g}', fill=(0, 0, 0))
    draw.line([left - 4, py, left, py], fill=(0, 0, 0))
    draw.text((4, py - 6), f'1e{yv:.1f}' if log_y else f'{yv:.3g}', fill=(0, 0, 0))
  draw.text((left + 4, 8), title, fill=(0, 0, 0))
  draw.text((width // 2 - 60, height - 18), x_label, fill=(0, 0, 0))
  draw.text((4, 12), y_label + (' (log10)' if log_y else ''), fill=(0, 0, 0))
  legend_x = width - right - 30 - max(draw.textlength(name) for name in prepared)
  for index, (name, (x, y)) in enumerate(prepared.items()):
    colour = _PLOT_COLOURS[index % len(_PLOT_COLOURS)]
    points = [to_pixel(a, b) for a, b in zip(x, y)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    legend_y = top + 8 + 14 * index
    draw.line([legend_x, legend_y + 6, legend_x + 20, legend_y + 6], fill=colour, width=2)
    draw.text((legend_x + 25, legend_y), name, fill=colour)
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format='PNG')
  return path


class MetricWriter:
  """TensorBoard event writer (tensorboardX, no TensorFlow); a no-op when not `enabled`.

  In multi-host runs pass enabled=(jax.process_index() == 0), so one process writes.
  Usable as a context manager (closes on exit).
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True, flush_secs: int = 60):
    """Opens an event file in `logdir` (created if missing) when enabled; otherwise
    touches nothing on disk."""
    self.logdir = os.fspath(logdir)
    self.enabled = bool(enabled)
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes {name: scalar} at `step`; values may be Python, numpy or jax 0-d numbers."""
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(str(name), float(np.asarray(value)), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes {name: image} at `step`.

    Each image is uint8 (H, W, 3) (float in [-1, 1] is converted), or a batch
    (N, H, W, 3), which is tiled into one grid with `image_grid`.
    """
    if self._writer is None:
      return
    for name, value in images.items():
      x = np.asarray(value)
      x = image_grid(x) if x.ndim == 4 else _as_rgb(to_uint8(x))
      self._writer.add_image(str(name), x, global_step=int(step), dataformats='HWC')

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters (for TensorBoard's HParams and Text tabs).

    Nested dicts are flattened to 'outer.inner' names; values that are not bool, int,
    float or str (lists, None, objects) are stored as their str().
    """
    if self._writer is None:
      return
    from tensorboardX.summary import hparams as hparams_summaries

    flat = {name: _hparam_value(value) for name, value in _flatten(dict(hparams)).items()}
    file_writer = self._writer._get_file_writer()  # pylint: disable=protected-access
    for summary in hparams_summaries(flat, {}):
      file_writer.add_summary(summary)
    rows = '\n'.join(f'| {name} | {value} |' for name, value in sorted(flat.items()))
    self._writer.add_text('hparams', '| name | value |\n|---|---|\n' + rows, global_step=0)

  def flush(self) -> None:
    """Writes pending events to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file; later writes are ignored."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """Seconds -> 'H:MM:SS' (e.g. 2577 -> '0:42:57'; a day or more: '1 day, 2:03:04')."""
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _format_metric(value: Any) -> str:
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    return str(value)
  if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
    return f'{v:.3e}'
  return f'{v:.4g}' if abs(v) >= 10 else f'{v:.3f}'


class ProgressLogger:
  """Logs training progress lines, at most one every `every_seconds` (and at the last step):

      step 1200/10000 (12.0%)  3.41 steps/s  ETA 0:42:57  d_loss 1.234 g_loss 0.987

  The rate is measured between log lines, from the first update() on (so the time spent
  before it, e.g. compilation, does not count), and smoothed with an exponential moving
  average; ETA = remaining steps / smoothed rate.
  """

  def __init__(self, total_steps: int, start_step: int = 0, every_seconds: float = 10.0,
               log_fn: Callable[[str], Any] = logging.info,
               clock: Callable[[], float] = time.monotonic, smoothing: float = 0.5):
    """
    Args:
      total_steps: the step at which training ends.
      start_step: the step training (re)starts from (the rate is measured from the first
        update(); start_step only serves when that first update is already the last step).
      every_seconds: minimum time between two log lines.
      log_fn: called with each line (absl's logging.info by default).
      clock: seconds, monotonic (inject a fake one in tests).
      smoothing: weight of the newest rate measurement in the moving average, in (0, 1].
    """
    if not 0.0 < smoothing <= 1.0:
      raise ValueError(f'smoothing must be in (0, 1], got {smoothing}')
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.every_seconds = float(every_seconds)
    self.log_fn = log_fn
    self.clock = clock
    self.smoothing = float(smoothing)
    self.rate: Optional[float] = None      # smoothed steps per second
    self._log_time: Optional[float] = None    # time of the last line (or first update)
    self._rate_time: Optional[float] = None   # (time, step) the next rate is measured from
    self._rate_step: Optional[int] = None
    self._created = clock()

  def eta_seconds(self, step: int) -> Optional[float]:
    """Estimated seconds left from `step`, None until a rate has been measured."""
    if not self.rate:
      return None
    return max(self.total_steps - step, 0) / self.rate

  def format_line(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> str:
    """The progress line for `step` with the current rate estimate."""
    span = self.total_steps if self.total_steps > 0 else 1
    parts = [f'step {step}/{self.total_steps} ({100.0 * step / span:.1f}%)']
    if self.rate is None:
      parts.append('-- steps/s  ETA --')
    else:
      rate = f'{self.rate:.2f}' if self.rate >= 0.1 else f'{self.rate:.3g}'
      eta = self.eta_seconds(step)
      parts.append(f'{rate} steps/s  ETA {format_duration(eta) if eta is not None else "--"}')
    if metrics:
      parts.append(' '.join(f'{name} {_format_metric(value)}' for name, value in metrics.items()))
    return '  '.join(parts)

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Notes that `step` is done; logs a line if `every_seconds` have passed since the last
    one (or since the first update), or if step >= total_steps.

    Args:
      step: the step just completed.
      metrics: {name: scalar} to append to the line (Python, numpy or jax numbers).

    Returns:
      the line logged, or None.
    """
    step = int(step)
    now = self.clock()
    if self._log_time is None:
      # The first call starts the clock: what ran before (compilation) is not counted.
      self._log_time = self._rate_time = now
      self._rate_step = step
      if step < self.total_steps:
        return None
      # A run whose first update is its last: measure from construction and start_step.
      self._rate_time, self._rate_step = self._created, self.start_step
    if step < self.total_steps and now - self._log_time < self.every_seconds:
      return None
    elapsed = now - self._rate_time
    if elapsed > 0 and step > self._rate_step:
      measured = (step - self._rate_step) / elapsed
      self.rate = measured if self.rate is None else (
          self.smoothing * measured + (1.0 - self.smoothing) * self.rate)
      self._rate_time, self._rate_step = now, step
    self._log_time = now
    line = self.format_line(step, metrics)
    self.log_fn(line)
    return line


class ProgressBar:
  """A one-line text progress bar for long renders, redrawn at most 5 times a second:

      rendering [##########..........]  50%  8.4M/16.8M pixels  1.2M/s  ETA 0:00:07

  Usable as the `progress(done, total)` callback of `sampling.render`.
  """

  def __init__(self, label: str = 'rendering', unit: str = 'pixels', stream=None,
               width: int = 20, clock: Callable[[], float] = time.perf_counter):
    import sys
    self.label, self.unit, self.width, self._clock = label, unit, width, clock
    self._stream = sys.stderr if stream is None else stream
    self._start = clock()
    self._last_draw = -math.inf

  @staticmethod
  def _count(value: float) -> str:
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
      if value >= scale:
        return f'{value / scale:.1f}{suffix}'
    return f'{value:.0f}'

  def format_line(self, done: int, total: int, elapsed: float) -> str:
    fraction = done / total if total else 1.0
    filled = int(round(fraction * self.width))
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return (f'{self.label} [{"#" * filled}{"." * (self.width - filled)}] {fraction:4.0%}  '
            f'{self._count(done)}/{self._count(total)} {self.unit}  {self._count(rate)}/s  '
            f'ETA {format_duration(eta) if eta is not None else "?"}')

  def __call__(self, done: int, total: int) -> None:
    now = self._clock()
    if done < total and now - self._last_draw < 0.2:
      return
    self._last_draw = now
    end = '\n' if done >= total else ''
    self._stream.write('\r' + self.format_line(done, total, now - self._start) + end)
    self._stream.flush()
