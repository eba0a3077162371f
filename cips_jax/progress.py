"""What a command shows on the console while it works: progress lines.

progress = ProgressLogger(total_steps, start_step)
progress.update(step, {'d_loss': d, 'g_loss': g})  # logs at most every 10 s
bar = ProgressBar('rendering')  # a progress(done, total) callback
format_duration(3725)  # '1:02:05'
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import numpy as np

from cips_jax import errors


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

  Usable as the `progress(done, total)` callback of `sampling.render` (unit
  'pixels') and of `inversion.invert` (unit 'steps').
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
    # Slow work (a few inversion steps a second) keeps its decimals.
    speed = self._count(rate) if rate >= 10 else f'{rate:.2g}'
    return (
      f'{self.label} [{"#" * filled}{"." * (self.width - filled)}] '
      f'{fraction:4.0%}  '
      f'{self._count(done)}/{self._count(total)} {self.unit}  '
      f'{speed}/s  '
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
