"""Tracing time of the training step: per-platform choices staged or pinned.

    python benchmarks/tracing.py            # a tiny step and the churches step
    python benchmarks/tracing.py --smoke    # the tiny step only

`platforms.dispatch` stages a per-platform choice (D's convolutions, G's
per-image form) with `lax.platform_dependent`, which traces every branch, and
differentiating through it traces more. A program jitted over a mesh of
devices pins the choice to their platform instead (`parallel.tracing_over`);
an export names its platforms (`platforms.exporting_for`). This measures
`jit(...).trace(...)` of both R1 and plain steps, best of `--repeats`, with
jax's caches cleared before each trace; nothing is compiled. Prints JSON.
"""

from __future__ import annotations

import contextlib
import time

from absl import app
from absl import flags
import common
import jax

from cips_jax import parallel
from cips_jax import platforms
from cips_jax import train

_SMOKE = flags.DEFINE_boolean('smoke', False, 'the tiny step only')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'traces per case (best kept)')
_OUT = flags.DEFINE_string('out', None, 'also write the JSON here')


def trace_seconds(config, staged: bool, repeats: int) -> dict[str, float]:
  """{'plain', 'r1'}: best seconds to trace each step of `config`."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  models, state, batch, shardings = train.abstract_step(
    config, mesh, config.train.global_batch_size
  )
  step = train.jit_train_step(models, shardings)
  seconds = {}
  for name, with_r1 in (('plain', False), ('r1', True)):
    best = float('inf')
    for _ in range(repeats):
      jax.clear_caches()
      start = time.perf_counter()
      # Staged: as an export for every platform traces it.
      context = (
        platforms.exporting_for() if staged else contextlib.nullcontext()
      )
      with context:
        step.trace(state, batch, models=models, with_r1=with_r1)
      best = min(best, time.perf_counter() - start)
    seconds[name] = round(best, 3)
  return seconds


def main(argv):
  common.check_no_arguments(argv)
  cases = {'tiny_8x8': common.train_config(8, 4, smoke=True)}
  if not _SMOKE.value:
    cases['churches_256'] = common.train_config(256, 4)
  report = {'machine': common.machine('cpu_count', 'jax'), 'cases': {}}
  for name, config in cases.items():
    staged = trace_seconds(config, True, _REPEATS.value)
    pinned = trace_seconds(config, False, _REPEATS.value)
    report['cases'][name] = {
      'staged_seconds': staged,
      'pinned_seconds': pinned,
      'staged_over_pinned': {
        k: round(staged[k] / pinned[k], 2) for k in staged
      },
    }
  common.print_json(report, out=_OUT.value)


if __name__ == '__main__':
  app.run(main)
