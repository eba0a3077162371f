"""Training-step speed, printed as JSON.

The full GAN step: D step + G step + EMA, no R1.

    # CIPSskip 64x64 batch 8 full width, and quickstart
    python benchmarks/train.py
    # the quickstart config only
    python benchmarks/train.py --quick

Cases:
- `cips_skip_64_full`: CIPSskip(size=64) at the reference's widths (512
  channels, hidden 512, style 512), Discriminator(size=64), 64x64 images, global
  batch 8, float32. The reference PyTorch code takes 46 s per such step on the
  project's 2-core CPU machine; that step does about 2.9 TFLOP of useful work
  (D's 3x3 convolutions ~33 GFLOP and G ~26 GFLOP per image per forward pass).
- `quickstart`: experiments/quickstart.py as configured.
For each: seconds per step (best of `--repeats` after compiling), steps/s,
images/s, XLA's own FLOP count of the step, and useful FLOP/s as a fraction of a
4096x4096 float32 `jnp.dot` timed in the same run. Options:
--compute_dtype=bfloat16, --remat.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import time

from generator import compiled_peak_bytes  # benchmarks/generator.py
from generator import matmul_gflops
import jax
import numpy as np

from cips_jax import configs
from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import parallel
from cips_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the reference PyTorch step on the same 2-core machine
REFERENCE_SECONDS_64 = 46.0
USEFUL_TFLOP_64 = 2.9  # useful work of that step (see the module docstring)


def load_config(path):
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def full_width_64_config():
  config = configs.reference_config()
  config.model.size = 64
  config.data.resolution = config.data.crop = 64
  config.train.global_batch_size = 8
  return config


def prepared_steps(config):
  """A config's fresh train state, its jitted steps and a random batch.

  Returns (state, {with_r1: step}, global batch), on a mesh of all devices.
  """
  mesh = parallel.make_mesh()
  gen, disc = train.build_models(config)
  g_tx, d_tx = train.make_optimizers(config)
  state = jax.jit(
    lambda: train.create_state(gen, disc, g_tx, d_tx, 0),
    out_shardings=parallel.replicated(mesh),
  )()
  steps = train.jit_train_steps(
    train.make_train_step(config, gen, disc, g_tx, d_tx), mesh
  )
  b, c = config.train.global_batch_size, config.data.crop
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
    {
      'image': rng.uniform(-1, 1, (b, c, c, 3)).astype(np.float32),
      'coords': np.broadcast_to(
        np.asarray(grids.uniform(c, c)), (b, c, c, 2)
      ).copy(),
    },
    mesh,
  )
  return state, steps, batch


def measure(name, config, repeats, matmul_rate, useful_tflop=None):
  state, steps, batch = prepared_steps(config)
  step = steps[False]
  b, c = config.train.global_batch_size, config.data.crop
  compiled = step.lower(state, batch).compile()
  flops = compiled.cost_analysis().get('flops', float('nan'))
  peak = compiled_peak_bytes(compiled)
  state, out = step(state, batch)  # compile and warm up
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, out = step(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  seconds = min(times)
  result = {
    'case': name,
    'batch': b,
    'resolution': c,
    'compute_dtype': config.train.compute_dtype,
    'remat': config.train.remat,
    'seconds_per_step': round(seconds, 3),
    'steps_per_s': round(1 / seconds, 4),
    'images_per_s': round(b / seconds, 3),
    'xla_counted_tflop_per_step': round(flops / 1e12, 4),
    'peak_mib': round(peak / 2**20, 1),
  }
  if useful_tflop is not None:
    rate = useful_tflop * 1e3 / seconds
    result.update(
      {
        'useful_tflop_per_step': useful_tflop,
        'useful_gflop_per_s': round(rate, 2),
        'fraction_of_matmul': round(rate / matmul_rate, 4),
        'speedup_vs_reference_pytorch': round(
          REFERENCE_SECONDS_64 / seconds, 3
        ),
      }
    )
  else:
    result['xla_counted_fraction_of_matmul'] = round(
      flops / seconds / 1e9 / matmul_rate, 4
    )
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--compute_dtype', default='float32')
  parser.add_argument('--remat', action='store_true')
  args = parser.parse_args()

  matmul_rate = matmul_gflops()
  cases = []
  if not args.quick:
    config = full_width_64_config()
    config.train.compute_dtype, config.train.remat = (
      args.compute_dtype,
      args.remat,
    )
    cases.append(
      measure(
        'cips_skip_64_full', config, args.repeats, matmul_rate, USEFUL_TFLOP_64
      )
    )
  config = load_config(os.path.join(REPO, 'experiments', 'quickstart.py'))
  config.train.compute_dtype, config.train.remat = (
    args.compute_dtype,
    args.remat,
  )
  cases.append(measure('quickstart', config, max(args.repeats, 5), matmul_rate))
  print(
    json.dumps(
      {
        'benchmark': 'train_step',
        'machine': {
          'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()],
          'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__,
          'host_malloc_reuse': host_malloc.configured,
        },
        'matmul_4096_f32_gflop_per_s': round(matmul_rate, 2),
        # The largest resident size of the process so far (over all cases run
        # before it).
        'process_max_rss_mib': round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        'cases': cases,
      },
      indent=1,
    )
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  main()
