"""Memory per device of every experiment config, planned from shapes; JSON.

    python benchmarks/memory_plan.py                # JSON on stdout
    python benchmarks/memory_plan.py --markdown     # also the docs table
    python benchmarks/memory_plan.py --smoke        # one config, no compile

For each experiments/*.py (`cips_jax.memory_plan`, nothing allocated): the
bytes per device of parameters, Adam state, EMA and the step's activations at
its own per-device batch (its global batch over the device count its
docstring names), with and without `train.remat`; and the largest per-device
batch that fits a 16 GB V100, an 80 GB A100/H100, a TPU v3 core (16 GiB) and
a TPU v4 chip (32 GiB), each less 10% kept for the runtime.

Cross-check (`--cross_check`, on by default): XLA's own memory analysis of the
training step compiled on this CPU, at small sizes, against the plan. D runs
XLA's convolutions there as on an accelerator (not the CPU's im2col).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import common
import jax
import jax.numpy as jnp

from cips_jax import memory_plan
from cips_jax import parallel
from cips_jax import train
from cips_jax import train_state

_MARKDOWN = flags.DEFINE_boolean(
  'markdown', False, 'also print the table for docs/benchmarks.md'
)
_SMOKE = flags.DEFINE_boolean(
  'smoke', False, 'one config and no cross-check (the tests run it)'
)
_CROSS_CHECK = flags.DEFINE_boolean(
  'cross_check', True, 'compile small steps and compare (a minute on a CPU)'
)
_OUT = flags.DEFINE_string('out', None, 'also write the JSON here')

GIB = 2**30
# Usable memory: the nominal size less 10% for the runtime, the compiled
# programs and fragmentation.
USABLE = 0.9
DEVICES = {
  'V100 16 GB': 16e9,
  'A100/H100 80 GB': 80e9,
  'TPU v3 core 16 GiB': 16 * GIB,
  'TPU v4 chip 32 GiB': 32 * GIB,
}
# The device count each config's docstring trains on.
REFERENCE_DEVICES = {
  'churches': 8,
  'ffhq256': 8,
  'ffhq1024': 8,
  'landscapes': 8,
  'panorama': 1,
  'quickstart': 1,
  'emoji': 1,
}


def mib(num_bytes: float) -> float:
  return round(num_bytes / 2**20, 1)


def config_row(name: str, config) -> dict:
  """The plan of one config, with and without remat, and what fits where."""
  devices = REFERENCE_DEVICES.get(name, 1)
  row = {
    'config': name,
    'devices': devices,
    'global_batch': config.train.global_batch_size,
    'resolution': config.data.crop,
    'compute_dtype': config.train.compute_dtype,
  }
  for remat in (False, True):
    config.train.remat = remat
    plan = memory_plan.plan(config, devices)
    key = 'remat' if remat else 'no_remat'
    row[key] = {
      'batch_per_device': plan.batch_per_device,
      'parameters_mib': mib(plan.parameters),
      'optimizer_mib': mib(plan.optimizer),
      'ema_mib': mib(plan.ema),
      'activations_mib': mib(plan.activations),
      'total_mib': mib(plan.total_bytes),
      'max_batch_per_device': {
        device: int(plan.max_batch(int(size * USABLE)))
        for device, size in DEVICES.items()
      },
    }
  return row


def cross_check(name: str, config) -> dict:
  """Compiled peak bytes of the R1 step on this CPU vs the plan, 1 device."""
  config.train.remat = False
  mesh = parallel.make_mesh(jax.devices()[:1])
  gen, disc, g_tx, d_tx, state = train_state.abstract_state(config)
  disc = disc.clone(conv_impl='xla')  # as on an accelerator
  steps = common.bound_steps(
    train.step_models(config, gen, disc, g_tx, d_tx, mesh)
  )
  b, c = config.train.global_batch_size, config.data.crop
  batch = {
    'image': jax.ShapeDtypeStruct((b, c, c, 3), jnp.float32),
    'coords': jax.ShapeDtypeStruct((b, c, c, 2), jnp.float32),
  }
  compiled = steps[True].lower(state, batch).compile()
  planned = memory_plan.plan(config, 1).total_bytes
  measured = common.compiled_peak_bytes(compiled)
  return {
    'config': name,
    'global_batch': b,
    'resolution': c,
    'planned_mib': mib(planned),
    'compiled_mib': mib(measured),
    'compiled_vs_planned': round(measured / planned, 3),
  }


def small_configs() -> dict:
  """Configs small enough to compile here, for the cross-check."""
  quickstart = common.load_config(
    os.path.join(common.REPO, 'experiments', 'quickstart.py')
  )
  wide = common.train_config(64, 8)
  wide.model.hidden_size = wide.model.style_dim = 128
  wide.model.max_channels = wide.model.d_max_channels = 128
  return {'quickstart': quickstart, '64x64, 128 wide, batch 8': wide}


def markdown(rows: list[dict]) -> str:
  """The docs table: one line per config and remat setting."""
  lines = [
    '| config | devices × batch | remat | parameters + Adam + EMA | '
    'activations | total per device | max batch per device: '
    + ' / '.join(DEVICES)
    + ' |',
    '|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    for key in ('no_remat', 'remat'):
      plan = row[key]
      state = plan['parameters_mib'] + plan['optimizer_mib'] + plan['ema_mib']
      fits = ' / '.join(str(plan['max_batch_per_device'][d]) for d in DEVICES)
      lines.append(
        f'| {row["config"]} | {row["devices"]} × '
        f'{plan["batch_per_device"]} | {"yes" if key == "remat" else "no"} '
        f'| {state / 1024:.2f} GiB | {plan["activations_mib"] / 1024:.2f} '
        f'GiB | {plan["total_mib"] / 1024:.2f} GiB | {fits} |'
      )
  return '\n'.join(lines)


def main(argv):
  common.check_no_arguments(argv)
  names = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(common.REPO, 'experiments'))
    if f.endswith('.py')
  )
  if _SMOKE.value:
    names = ['quickstart']
  rows = [
    config_row(
      name,
      common.load_config(
        os.path.join(common.REPO, 'experiments', f'{name}.py')
      ),
    )
    for name in names
  ]
  checks = []
  if _CROSS_CHECK.value and not _SMOKE.value:
    checks = [cross_check(n, c) for n, c in small_configs().items()]
  report = {
    'benchmark': 'memory_plan',
    'machine': common.machine('backend', 'jax'),
    'usable_fraction': USABLE,
    'devices': {k: int(v) for k, v in DEVICES.items()},
    'configs': rows,
    'cross_check': checks,
  }
  common.print_json(report, out=_OUT.value)
  if _MARKDOWN.value:
    print(markdown(rows))


if __name__ == '__main__':
  app.run(main)
