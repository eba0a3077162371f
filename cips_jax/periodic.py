"""Periodic work in a training loop: one mechanism for logging, samples,
evaluation, checkpoints and profiling.

    actions = [
        periodic.Every(100, write_metrics, at_steps={num_steps}),
        periodic.Profile(logdir, first_step=start + 2, num_steps=5),
    ]
    for step in ...:
      state = train_step(state, ...)
      for action in actions:
        action(step + 1, state)
    for action in actions:
      action.finish(step + 1, state)

Each action runs at most once per step. `finish` is the loop's last word to
every action, however it ended (the last step, or a preemption): a checkpoint
made `at_finish` is saved there unless it just was, a profiler trace stops. The
interface follows clu's `periodic_actions` (`every_steps`, `on_steps`,
`PeriodicCallback`, `Profile`); clu's module itself imports TensorFlow
(through `clu.metric_writers`), which this package never requires.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterable

from absl import logging
import jax


class Every:
  """Calls `work(step, state)` every `every_steps` steps and at `at_steps`.

  `every_steps` 0 (or None) means never periodically. `step` is the number of
  steps completed, so `every_steps=100` runs after steps 100, 200, ...
  `at_finish`: also run when the loop finishes early (`finish`).
  """

  def __init__(
    self,
    every_steps: int | None,
    work: Callable[[int, Any], None],
    *,
    at_steps: Iterable[int] = (),
    at_finish: bool = False,
  ):
    self.every_steps = every_steps or 0
    self.work = work
    self.at_steps = frozenset(at_steps)
    self.at_finish = at_finish
    self.last_step = None

  def due(self, step: int) -> bool:
    """Whether `step` is one of this action's steps."""
    periodic = self.every_steps and step % self.every_steps == 0
    return bool(periodic) or step in self.at_steps

  def __call__(self, step: int, state: Any) -> bool:
    """Runs the work if `step` is due; returns whether it ran."""
    if self.due(step):
      return self.force(step, state)
    return False

  def force(self, step: int, state: Any) -> bool:
    """Runs the work at `step` unless it already ran there."""
    if self.last_step == step:
      return False
    self.last_step = step
    self.work(step, state)
    return True

  def finish(self, step: int, state: Any) -> bool:
    """The loop ended after `step` steps: runs the work there if `at_finish`
    (unless it already ran there)."""
    return self.force(step, state) if self.at_finish else False


class Profile:
  """Writes a profiler trace of `num_steps` steps, for TensorBoard.

  The trace starts once `first_step` steps are done and stops `num_steps`
  steps later (or when the loop ends: `stop`). It lands in
  `logdir/plugins/profile/<time>/`, where TensorBoard's profile plugin finds
  it when pointed at `logdir`. Each step inside should run under
  `jax.profiler.StepTraceAnnotation` so the trace viewer splits it by step.
  """

  def __init__(self, logdir: str, *, first_step: int, num_steps: int):
    self.logdir = logdir
    self.first_step = first_step
    self.num_steps = num_steps
    self.tracing = False

  def __call__(self, step: int, state: Any) -> bool:
    """Starts or stops the trace when `step` steps are done."""
    if not self.num_steps:
      return False
    if step == self.first_step and not self.tracing:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
      logging.info('profiling steps %d to %d', step + 1, step + self.num_steps)
      return True
    if self.tracing and step >= self.first_step + self.num_steps:
      self.stop(state)
      return True
    return False

  def finish(self, step: int, state: Any) -> bool:
    """The loop ended: stops a running trace; returns whether one ran."""
    del step
    tracing = self.tracing
    self.stop(state)
    return tracing

  def stop(self, state: Any = None) -> None:
    """Ends the trace (if one runs) once `state` is computed, and writes it."""
    if not self.tracing:
      return
    # Dispatch is asynchronous: wait for the traced steps' work to finish.
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.tracing = False
    logging.info('profiler trace written under %s', self.logdir)


class Preemption:
  """Remembers a SIGTERM so the loop can checkpoint and stop.

  It stops at the end of the current step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:
      # Not the main thread: no handler, runs are not preemptible.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning(
      'SIGTERM received: saving a checkpoint and stopping after this step'
    )
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
