"""What a run reports to its user: TensorBoard events and progress lines.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_hparams(config)  # nested dicts are flattened
    writer.write_scalars(step, {'d_loss': d, 'g_loss': g})
    writer.write_images(step, {'samples': samples})  # a batch is tiled
    progress = ProgressLogger(total_steps, start_step)
    progress.update(step, {'d_loss': d, 'g_loss': g})  # logs at most every 10 s
    report = TrainingReport(writer, total_steps, start_step, batch_size)
    report.add(step_outputs)  # every step: averaged until the next write
    report.write(step)  # checks they are finite, logs, writes scalars
    curves = read_scalars(workdir)  # {'d_loss': [(step, value), ...], ...}
    bar = ProgressBar('rendering')  # a progress(done, total) callback

Events go through tensorboardX, so nothing here needs TensorFlow.
"""

from __future__ import annotations

import datetime
import glob
import math
import os
import struct
import sys
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
from clu import metrics as clu_metrics
import jax
import numpy as np
import tensorboardX
from tensorboardX.proto import event_pb2
from tensorboardX.summary import hparams as hparams_summaries

from cips_jax import errors
from cips_jax import images as images_lib


def _flatten(
  tree: Mapping[str, Any], prefix: str = '', sep: str = '.'
) -> dict[str, Any]:
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
  """A value TensorBoard's hparams plugin accepts.

  bool, int, float or str; anything else becomes its str.
  """
  if isinstance(value, np.generic) or (
    hasattr(value, 'dtype') and np.ndim(value) == 0
  ):
    value = np.asarray(value).item()  # numpy / jax 0-d numbers
  if isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


class MetricWriter:
  """TensorBoard event writer (tensorboardX, no TensorFlow).

  A no-op when not `enabled`. In multi-host runs pass
  enabled=(jax.process_index() == 0), so one process writes. Usable as a context
  manager (closes on exit).
  """

  def __init__(
    self, logdir: str | os.PathLike, enabled: bool = True, flush_secs: int = 60
  ):
    """Opens an event file in `logdir` (created if missing) when enabled.

    Otherwise touches nothing on disk.
    """
    self.logdir = os.fspath(logdir)
    self.enabled = bool(enabled)
    self._writer = None
    if self.enabled:
      self._writer = tensorboardX.SummaryWriter(
        logdir=self.logdir, flush_secs=flush_secs
      )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes {name: scalar} at `step`.

    The values may be Python, numpy or jax 0-d numbers.
    """
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(
        str(name), float(np.asarray(value)), global_step=int(step)
      )

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes {name: image} at `step`.

    Each image is uint8 (H, W, 3) (float in [-1, 1] is converted), or a batch
    (N, H, W, 3), which is tiled into one grid with `image_grid`.
    """
    if self._writer is None:
      return
    for name, value in images.items():
      x = np.asarray(value)
      x = (
        images_lib.image_grid(x)
        if x.ndim == 4
        else images_lib.as_rgb(images_lib.to_uint8(x))
      )
      self._writer.add_image(
        str(name), x, global_step=int(step), dataformats='HWC'
      )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters.

    For TensorBoard's HParams and Text tabs. Nested dicts are flattened to
    'outer.inner' names; values that are not bool, int, float or str (lists,
    None, objects) are stored as their str().
    """
    if self._writer is None:
      return
    flat = {
      name: _hparam_value(value)
      for name, value in _flatten(dict(hparams)).items()
    }
    # Not add_hparams, which opens a sub-folder (a second run in TensorBoard):
    # the summaries go into this run's own event file, with no metrics (those
    # are the scalars).
    file_writer = self._writer._get_file_writer()  # pylint: disable=protected-access
    for summary in hparams_summaries(flat, {}):
      file_writer.add_summary(summary)
    # The same values as a Markdown table for the Text tab, readable without
    # the HParams plugin.
    rows = '\n'.join(
      f'| {name} | {value} |' for name, value in sorted(flat.items())
    )
    self._writer.add_text(
      'hparams', '| name | value |\n|---|---|\n' + rows, global_step=0
    )

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
  """Seconds -> 'H:MM:SS'.

  For example 2577 -> '0:42:57'; a day or more: '1 day, 2:03:04'.
  """
  # timedelta's str is H:MM:SS, with a '1 day, ' style prefix past 24 hours.
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _format_metric(value: Any) -> str:
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    return str(value)
  # Scientific only where fixed point would need many digits or show zeros.
  if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
    return f'{v:.3e}'
  return f'{v:.4g}' if abs(v) >= 10 else f'{v:.3f}'


class ProgressLogger:
  """Logs training progress lines.

  At most one every `every_seconds` (and one at the last step), such as

      step 1200/10000 (12.0%)  3.41 steps/s  ETA 0:42:57  d_loss 1.234

  The rate is measured between log lines, from the first update() on (so the
  time spent before it, e.g. compilation, does not count), and smoothed with an
  exponential moving average; ETA = remaining steps / smoothed rate.
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    every_seconds: float = 10.0,
    log_fn: Callable[[str], Any] = logging.info,
    clock: Callable[[], float] = time.monotonic,
    smoothing: float = 0.5,
  ):
    """Sets up the logger.

    Args:
      total_steps: the step at which training ends.
      start_step: the step training (re)starts from (the rate is measured from
        the first update(); start_step only serves when that first update is
        already the last step).
      every_seconds: minimum time between two log lines.
      log_fn: called with each line (absl's logging.info by default).
      clock: seconds, monotonic (inject a fake one in tests).
      smoothing: weight of the newest rate measurement in the moving average, in
        (0, 1].
    """
    if not 0.0 < smoothing <= 1.0:
      raise errors.InputError(f'smoothing must be in (0, 1], got {smoothing}')
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.every_seconds = float(every_seconds)
    self.log_fn = log_fn
    self.clock = clock
    self.smoothing = float(smoothing)
    self.rate: Optional[float] = None  # smoothed steps per second
    # time of the last line (or first update)
    self._log_time: Optional[float] = None
    # (time, step) the next rate is measured from
    self._rate_time: Optional[float] = None
    self._rate_step: Optional[int] = None
    self._created = clock()

  def eta_seconds(self, step: int) -> Optional[float]:
    """Estimated seconds left from `step`; None until a rate is measured."""
    if not self.rate:
      return None
    return max(self.total_steps - step, 0) / self.rate

  def format_line(
    self, step: int, metrics: Optional[Mapping[str, Any]] = None
  ) -> str:
    """The progress line for `step` with the current rate estimate."""
    span = self.total_steps if self.total_steps > 0 else 1
    parts = [f'step {step}/{self.total_steps} ({100.0 * step / span:.1f}%)']
    if self.rate is None:
      parts.append('-- steps/s  ETA --')
    else:
      rate = f'{self.rate:.2f}' if self.rate >= 0.1 else f'{self.rate:.3g}'
      eta = self.eta_seconds(step)
      parts.append(
        f'{rate} steps/s  ETA '
        f'{format_duration(eta) if eta is not None else "--"}'
      )
    if metrics:
      parts.append(
        ' '.join(
          f'{name} {_format_metric(value)}' for name, value in metrics.items()
        )
      )
    return '  '.join(parts)

  def update(
    self, step: int, metrics: Optional[Mapping[str, Any]] = None
  ) -> Optional[str]:
    """Notes that `step` is done; logs a line when one is due.

    A line is due if `every_seconds` have passed since the last one (or since
    the first update), or if step >= total_steps.

    Args:
      step: the step just completed.
      metrics: {name: scalar} to append to the line (Python, numpy or jax
        numbers).

    Returns:
      the line logged, or None.
    """
    step = int(step)
    now = self.clock()
    if self._log_time is None:
      # The first call starts the clock: what ran before (compilation) is not
      # counted.
      self._log_time = self._rate_time = now
      self._rate_step = step
      if step < self.total_steps:
        return None
      # A run whose first update is its last: measure from construction and
      # start_step.
      self._rate_time, self._rate_step = self._created, self.start_step
    if step < self.total_steps and now - self._log_time < self.every_seconds:
      return None
    elapsed = now - self._rate_time
    if elapsed > 0 and step > self._rate_step:
      measured = (step - self._rate_step) / elapsed
      self.rate = (
        measured
        if self.rate is None
        else (self.smoothing * measured + (1.0 - self.smoothing) * self.rate)
      )
      self._rate_time, self._rate_step = now, step
    self._log_time = now
    line = self.format_line(step, metrics)
    self.log_fn(line)
    return line


class ProgressBar:
  """A one-line text progress bar for long renders.

  Redrawn at most 5 times a second:

    rendering [##########..........]  50%  2.1M/4.2M pixels  1.2M/s  ETA 0:00:02

  Usable as the `progress(done, total)` callback of `sampling.render`.
  """

  def __init__(
    self,
    label: str = 'rendering',
    unit: str = 'pixels',
    stream=None,
    width: int = 20,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.label, self.unit, self.width, self._clock = label, unit, width, clock
    self._stream = sys.stderr if stream is None else stream
    self._start = clock()
    self._last_draw = -math.inf  # the first call always draws

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
    return (
      f'{self.label} [{"#" * filled}{"." * (self.width - filled)}] '
      f'{fraction:4.0%}  '
      f'{self._count(done)}/{self._count(total)} {self.unit}  '
      f'{self._count(rate)}/s  '
      f'ETA {format_duration(eta) if eta is not None else "?"}'
    )

  def __call__(self, done: int, total: int) -> None:
    now = self._clock()
    # Throttled, except the final call, so the finished bar is always shown.
    if done < total and now - self._last_draw < 0.2:
      return
    self._last_draw = now
    # '\r' redraws the same line; the newline comes only when done.
    end = '\n' if done >= total else ''
    self._stream.write(
      '\r' + self.format_line(done, total, now - self._start) + end
    )
    self._stream.flush()


class TrainingReport:
  """Averages a training run's step outputs between writes and reports them.

  Each named scalar is averaged over the steps that produced it (R1's penalty
  only over R1 steps), with clu's `Average` so the sums stay on the device
  until a write. `write` checks the averages are finite, logs a progress line
  and writes them to TensorBoard with steps/s and images/s.
  """

  def __init__(
    self,
    writer: MetricWriter,
    total_steps: int,
    start_step: int,
    batch_size: int,
  ):
    self.writer = writer
    self.batch_size = batch_size
    self.progress = ProgressLogger(total_steps, start_step)
    self.averages: dict[str, clu_metrics.Average] = {}
    self.last_time, self.last_step = time.perf_counter(), start_step

  def add(self, outputs: Mapping[str, jax.Array]) -> None:
    """Adds one step's scalar outputs {name: value}."""
    for name, value in outputs.items():
      # Sums on the device: nothing here waits for the step to finish.
      update = clu_metrics.Average.from_model_output(value)
      previous = self.averages.get(name)
      self.averages[name] = (
        update if previous is None else previous.merge(update)
      )

  def write(self, step: int, state: Any = None) -> None:
    """Reports the averages since the last write, as of `step` steps done.

    Raises FloatingPointError, before anything is written, if one is not
    finite: the loop calls this before each checkpoint, so a diverged state
    is never saved.
    """
    del state  # the periodic-action signature
    if not self.averages:
      return
    # The interval's one host sync.
    values = {k: float(v.compute()) for k, v in self.averages.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
      raise errors.DivergedError(
        f'non-finite training metrics at step {step}: {bad}. Training '
        'stopped before saving this state; every checkpoint written holds a '
        'finite state (lower the learning rates, or check the data).'
      )
    now = time.perf_counter()
    # Unsmoothed, over exactly this interval's steps, for TensorBoard.
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    # The progress line shows its own steps/s and ETA.
    self.progress.update(step, values)
    values.update({'steps_per_s': rate, 'images_per_s': rate * self.batch_size})
    self.writer.write_scalars(step, values)
    self.averages = {}
    self.last_time, self.last_step = now, step


def read_events(logdir: str | os.PathLike) -> list[event_pb2.Event]:
  """Every Event of the TensorBoard event files under `logdir` (recursively).

  Read from the files' TFRecord framing (uint64 length, uint32 CRC, the
  event, uint32 CRC) without TensorFlow; files in name order.
  """
  events = []
  pattern = os.path.join(os.fspath(logdir), '**', 'events.out.tfevents.*')
  for path in sorted(glob.glob(pattern, recursive=True)):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[offset : offset + 8])
      offset += 12  # the length and its CRC
      event = event_pb2.Event()
      event.ParseFromString(data[offset : offset + length])
      events.append(event)
      offset += length + 4  # the event and its CRC
  return events


def read_scalars(
  logdir: str | os.PathLike,
) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalars written under `logdir`.

  For example a workdir's `tensorboard/` folder: d_loss, g_loss, eval/fid...
  Steps ascend; a step written twice (a resumed run) keeps its last value.
  """
  scalars: dict[str, dict[int, float]] = {}
  for event in read_events(logdir):
    if not event.HasField('summary'):
      continue
    for value in event.summary.value:
      if value.WhichOneof('value') == 'simple_value':
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return {tag: sorted(points.items()) for tag, points in scalars.items()}
