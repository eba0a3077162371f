"""What a run records: TensorBoard events, written and read back.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_hparams(config)  # nested dicts are flattened
    writer.write_scalars(step, {'d_loss': d, 'g_loss': g})
    writer.write_images(step, {'samples': samples})  # a batch is tiled
    report = TrainingReport(writer, total_steps, start_step, batch_size)
    report.add(step_outputs)  # every step: averaged until the next write
    report.write(step)  # checks they are finite, logs, writes scalars
    curves = read_scalars(workdir)  # {'d_loss': [(step, value), ...], ...}

The progress lines on the console are `progress`'s.

Events go through tensorboardX, so nothing here needs TensorFlow.
"""

from __future__ import annotations

import glob
import math
import os
import struct
import time
from typing import Any, Mapping

from clu import metrics as clu_metrics
import jax
import numpy as np
import tensorboardX
from tensorboardX.proto import event_pb2
from tensorboardX.summary import hparams as hparams_summaries

from cips_jax import errors
from cips_jax import images as images_lib
from cips_jax import progress as progress_lib


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
    self.progress = progress_lib.ProgressLogger(total_steps, start_step)
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
