"""The whole benchmark suite in one JSON document, for the machine it runs on.

    # ~15 min on 2 CPU cores; a few minutes on a GPU
    python benchmarks/run_all.py
    # smaller sizes, one repeat
    python benchmarks/run_all.py --quick
    # a 16-wide model at 32x32: checks the code runs
    python benchmarks/run_all.py --smoke

In one process: the machine's matmul rate (float32 and bfloat16 4096^2
`jnp.dot`), then
- generator: CIPSskip-256 at 256x256, images/s, GFLOP/s and the fraction of the
  matmul rate of the same dtype, peak memory (XLA's buffer assignment), for
  per-image styles in float32 and bfloat16, a two-style mixture and an arbitrary
  w per pixel; their time and memory ratios to per-image styles;
- scaling: per-image render time and peak memory from 64^2 to 512^2 (linear in
  pixels means a constant time per pixel), plus a chunked `sampling.render` of a
  large grid (1024^2 on a CPU, 4096^2 on an accelerator; benchmarks/render.py
  measures 4096^2 on a CPU);
- training: the full GAN step (D step, G step, EMA) at 64x64 and 256x256, with
  and without rematerialisation, images/s, XLA-counted FLOP/s, peak memory; at
  64x64 batch 8 also the speed-up over the reference PyTorch step on the
  project's 2-core CPU (46 s);
- library calls: benchmarks/library_call.py (the README's calls in a fresh
  process, against a hand-written jit with reused host memory).
Sizes grow on accelerators (batch 16 renders, batch 32/8 training steps).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import common
import jax
import jax.numpy as jnp

from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import models
from cips_jax import sampling

_QUICK = flags.DEFINE_boolean('quick', False, 'smaller sizes, one repeat')
_SKIP_TRAIN = flags.DEFINE_boolean('skip_train', False, 'no training cases')
_SMOKE = flags.DEFINE_boolean(
  'smoke',
  False,
  'a tiny model and grid: checks the suite runs (figures meaningless)',
)


def generator_cases(on_accelerator, quick, rates, smoke=False):
  """Per-image styles in float32 and bfloat16, a mixture, a w per pixel.

  Returns (cases, their time and memory ratios to per-image styles, the
  float32 (generator, variables)).
  """
  batch = 16 if on_accelerator else 1
  # Three: with host_malloc the heap settles within the first calls of a new
  # shape.
  repeats = 1 if quick or smoke else 3
  side = common.SMOKE_SIDE if smoke else 256
  gen32 = models.CIPSskip(**common.SMOKE_MODEL) if smoke else models.CIPSskip()
  variables = models.init(gen32, jax.random.key(0))
  gen16 = gen32.clone(dtype=jnp.bfloat16)
  cases = [
    common.generator_case(
      gen,
      variables,
      'per_image',
      batch,
      side,
      repeats,
      rates[jnp.dtype(gen.dtype).name],
    )
    for gen in (gen32, gen16)
  ]
  for kind in ('mixture2', 'per_pixel'):
    cases.append(
      common.generator_case(
        gen32, variables, kind, batch, side, repeats, rates['float32']
      )
    )
  base = cases[0]
  ratios = {
    f'{c["style"]}_vs_per_image': {
      'time': round(c['seconds'] / base['seconds'], 3),
      'peak_memory': round(c['peak_mib'] / base['peak_mib'], 3),
    }
    for c in cases[2:]
  }
  return cases, ratios, (gen32, variables)


def scaling_cases(model, on_accelerator, quick, smoke=False):
  """Per-image render time and peak memory by grid side; a chunked render."""
  gen, variables = model
  w = sampling.mapping(
    gen, variables, jax.random.normal(jax.random.key(1), (1, gen.style_dim))
  )
  render = jax.jit(lambda v, w, c: sampling.synthesize(gen, v, w, c))
  cases = []
  sides = (16, 32) if smoke else (64, 128) if quick else (64, 128, 256, 512)
  for side in sides:
    coords = grids.uniform(side, side)
    seconds = common.best_time(
      render, variables, w, coords, repeats=1 if quick else 3
    )
    peak = common.peak_bytes(render, variables, w, coords)
    cases.append(
      {
        'side': side,
        'pixels': side * side,
        'seconds': round(seconds, 4),
        'microseconds_per_pixel': round(1e6 * seconds / side**2, 3),
        'peak_mib': round(peak / 2**20, 1),
      }
    )
  side = 64 if smoke else 4096 if on_accelerator else (256 if quick else 1024)
  # Compile the chunk.
  sampling.render(gen, variables, w, grids.uniform(256, 256))
  start = time.perf_counter()
  sampling.render(gen, variables, w, grids.uniform(side, side))
  seconds = time.perf_counter() - start
  chunk = jax.jit(lambda v, w, c: sampling.synthesize(gen, v, w, c))
  chunk_peak = common.peak_bytes(
    chunk, variables, w, jnp.zeros((sampling.RENDER_CHUNK, 2))
  )
  chunked = {
    'side': side,
    'pixels': side * side,
    'seconds': round(seconds, 2),
    'microseconds_per_pixel': round(1e6 * seconds / side**2, 3),
    'chunk_pixels': sampling.RENDER_CHUNK,
    'chunk_program_peak_mib': round(chunk_peak / 2**20, 1),
    'output_mib': round(side * side * 3 * 4 / 2**20, 1),
  }
  per_pixel = [c['microseconds_per_pixel'] for c in cases]
  return {
    'uniform_grids': cases,
    'chunked_render': chunked,
    'time_per_pixel_max_over_min': round(max(per_pixel) / min(per_pixel), 3),
    'peak_mib_per_megapixel_by_side': {
      c['side']: round(c['peak_mib'] / (c['pixels'] / 2**20), 1) for c in cases
    },
  }


def train_cases(on_accelerator, quick, rate, smoke=False):
  """The full-width GAN step at 64^2 and 256^2, with and without remat."""
  cases = []
  sizes = ((64, 32), (256, 8)) if on_accelerator else ((64, 8), (256, 1))
  if quick:
    sizes = sizes[:1]
  if smoke:
    sizes = ((16, 4),)
  for side, batch in sizes:
    for remat in (False,) if smoke else (False, True):
      config = common.train_config(side, batch, remat=remat, smoke=smoke)
      reference = side == 64 and batch == 8 and not smoke
      cases.append(
        common.train_step_case(
          f'cips_skip_{side}_full',
          config,
          1 if quick else 2,
          rate,
          common.USEFUL_TFLOP_64 if reference else None,
        )
      )
  return cases


def library_call_case(smoke=False):
  """benchmarks/library_call.py: the README's library calls vs the best path.

  Each path runs in a fresh process.
  """
  return common.run_for_json(
    [sys.executable, os.path.join(common.BENCHMARKS, 'library_call.py')]
    + (['--smoke'] if smoke else []),
    timeout=3600,
  )


def main(argv):
  common.check_no_arguments(argv)
  quick, smoke = _QUICK.value, _SMOKE.value
  on_accelerator = jax.default_backend() != 'cpu'
  start = time.perf_counter()
  rates = {
    name: common.matmul_gflops(n=256 if smoke else 4096, dtype=jnp.dtype(name))
    for name in ('float32', 'bfloat16')
  }
  generator, ratios, model = generator_cases(
    on_accelerator, quick, rates, smoke
  )
  scaling = scaling_cases(model, on_accelerator, quick, smoke)
  training = (
    []
    if _SKIP_TRAIN.value
    else train_cases(on_accelerator, quick, rates['float32'], smoke)
  )
  library = library_call_case(smoke)
  common.print_json(
    {
      'suite': 'cips_jax benchmarks/run_all.py',
      'smoke': smoke,
      'machine': common.machine(
        'backend',
        ('devices', 'device_kinds'),
        'processor',
        'cpu_count',
        'jax',
        'host_malloc_reuse',
      ),
      'matmul_4096_gflop_per_s': {k: round(v, 2) for k, v in rates.items()},
      'generator_256': generator,
      'generator_ratios': ratios,
      'scaling': scaling,
      'train_step': training,
      'library_call': library,
      'seconds_total': round(time.perf_counter() - start, 1),
    }
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  app.run(main)
