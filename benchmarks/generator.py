"""Generator speed and memory, printed as JSON.

CIPSskip-256 rendering a 256x256 grid.

    # the full set (about 5 min on 2 CPU cores)
    python benchmarks/generator.py
    # batch 1 only, fewer repeats
    python benchmarks/generator.py --quick

Cases (all at `--resolution`, default 256):
- `per_image`: one w per image (float32 and bfloat16 matmul inputs), for each
  batch size and each per-image style form (`--forms`: the activations scaled
  around each product, or the style folded into one weight per image);
- `mixture2`: a soft left-right blend of two styles per image (`ws` (B, 2, D) +
  `mix`);
- `per_pixel`: an arbitrary w in every pixel (`w` (B, H, W, D)).
For each: seconds per call (best of `--repeats`, after compilation), images/s,
achieved GFLOP/s counting 2 x 222.9 GMAC of useful work per 256^2 image
(3,401,344 MAC per pixel), the fraction of the measured matmul rate, the
multiply-accumulates per pixel the style form really needs
(`mac_per_pixel_done`: a per-pixel style adds its affines and demodulations),
and peak memory as XLA's buffer assignment reports it (arguments + outputs +
temporaries). The matmul rate is a 4096x4096 float32 `jnp.dot` timed in the same
run, so every ratio compares numbers from one process on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import generator as generator_lib
from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import models
from cips_jax import sampling

# CIPSskip-256, counted from the reference architecture
MAC_PER_PIXEL = 3_401_344


def best_time(fn, *args, repeats: int) -> float:
  """Best wall time of `fn(*args)` over `repeats` calls, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def peak_bytes(jitted, *args) -> int:
  """Arguments + outputs + temporaries of the compiled call.

  As XLA's buffer assignment reports them.
  """
  return compiled_peak_bytes(jitted.lower(*args).compile())


def compiled_peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - aliased buffers of a compiled program.

  `compiled` is a compiled XLA program.
  """
  analysis = compiled.memory_analysis()
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def matmul_gflops(n: int = 4096, repeats: int = 3, dtype=jnp.float32) -> float:
  """GFLOP/s of an n x n x n `jnp.dot` with `dtype` inputs.

  The products accumulate in float32.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  seconds = best_time(dot, a, a, repeats=repeats)
  return 2 * n**3 / seconds / 1e9


def style_inputs(kind: str, batch: int, resolution: int, style_dim: int):
  """(w, mix) for one of the style forms."""
  key_w, key_p = jax.random.split(jax.random.key(1))
  if kind == 'per_image':
    return jax.random.normal(key_w, (batch, style_dim)), None
  if kind == 'mixture2':
    ws = jax.random.normal(key_w, (batch, 2, style_dim))
    # A soft left-right blend: weight of the right style rises smoothly across
    # the width.
    t = jax.nn.sigmoid(8.0 * grids.uniform(resolution, resolution)[..., 0])
    mix = jnp.stack([1.0 - t, t], axis=-1)
    return ws, jnp.broadcast_to(mix, (batch, resolution, resolution, 2))
  if kind == 'per_pixel':
    return jax.random.normal(
      key_p, (batch, resolution, resolution, style_dim)
    ), None
  raise ValueError(kind)


def macs_per_pixel(variables, kind: str, num_styles: int = 2) -> int:
  """Multiply-accumulates per pixel, counted from the parameter shapes.

  Every style form does the pixel MLP (each modulated kernel in x out, plus the
  Fourier features). A style per pixel adds, for every modulated layer, its
  style affine (D x in) and, where it demodulates, the demodulation product (in
  x out). A K-style mixture adds the blend (K x in) and the K^2-term
  demodulation (K^2 x out).
  """
  flat = flax.traverse_util.flatten_dict(variables['params'])
  total = int(np.prod(flat[('fourier', 'kernel')].shape))
  for path, kernel in flat.items():
    if path[-2:] != ('modulated', 'kernel'):
      continue
    fan_in, out = kernel.shape
    demodulates = not any(name.startswith('to_rgb') for name in path)
    style_dim = flat[path[:-1] + ('modulation', 'kernel')].shape[0]
    total += fan_in * out
    if kind == 'per_pixel':
      total += style_dim * fan_in + (fan_in * out if demodulates else 0)
    elif kind == 'mixture2':
      total += num_styles * fan_in + (num_styles**2 * out if demodulates else 0)
  return total


def run_case(
  gen, variables, kind, batch, resolution, repeats, matmul_rate, chunk_size=None
):
  coords = grids.uniform(resolution, resolution)
  w, mix = style_inputs(kind, batch, resolution, gen.style_dim)
  render = jax.jit(
    lambda v, c, w, mix: sampling.synthesize(
      gen, v, w, c, mix=mix, chunk_size=chunk_size
    )
  )
  seconds = best_time(render, variables, coords, w, mix, repeats=repeats)
  gflop = 2 * MAC_PER_PIXEL * resolution**2 * batch / 1e9
  return {
    'style': kind,
    'form': generator_lib.resolve_per_image_form(gen.per_image_form)
    if kind == 'per_image'
    else generator_lib.MODULATED_ACTIVATIONS,
    'dtype': jnp.dtype(gen.dtype).name,
    'batch': batch,
    'resolution': resolution,
    'seconds': round(seconds, 4),
    'images_per_s': round(batch / seconds, 4),
    'gflop_per_s': round(gflop / seconds, 2),
    'fraction_of_matmul': round(gflop / seconds / matmul_rate, 4),
    'mac_per_pixel_done': macs_per_pixel(variables, kind),
    'peak_mib': round(peak_bytes(render, variables, coords, w, mix) / 2**20, 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolution', type=int, default=256)
  parser.add_argument('--batch_sizes', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument(
    '--quick', action='store_true', help='batch 1, one repeat'
  )
  parser.add_argument(
    '--forms',
    nargs='+',
    default=[generator_lib.MODULATED_ACTIVATIONS, generator_lib.FOLDED_WEIGHTS],
    choices=generator_lib.PER_IMAGE_FORMS[:2],
  )
  args = parser.parse_args()
  if args.quick:
    args.batch_sizes, args.repeats = [1], 1

  matmul_rate = matmul_gflops()
  gen32 = models.CIPSskip(per_image_form=generator_lib.MODULATED_ACTIVATIONS)
  variables = models.init(gen32, jax.random.key(0))
  cases = []
  for batch in args.batch_sizes:
    for dtype in (jnp.float32, jnp.bfloat16):
      for form in args.forms:
        cases.append(
          run_case(
            gen32.clone(dtype=dtype, per_image_form=form),
            variables,
            'per_image',
            batch,
            args.resolution,
            args.repeats,
            matmul_rate,
          )
        )
  biggest = max(args.batch_sizes)
  for kind in ('mixture2', 'per_pixel'):
    cases.append(
      run_case(
        gen32,
        variables,
        kind,
        biggest,
        args.resolution,
        args.repeats,
        matmul_rate,
      )
    )

  base = next(
    c
    for c in cases
    if c['style'] == 'per_image'
    and c['form'] == generator_lib.MODULATED_ACTIVATIONS
    and c['dtype'] == 'float32'
    and c['batch'] == biggest
  )
  forms = {
    f'{c["dtype"]}_batch{c["batch"]}': round(
      c['seconds']
      / next(
        a['seconds']
        for a in cases
        if a['style'] == 'per_image'
        and a['form'] == generator_lib.MODULATED_ACTIVATIONS
        and (a['dtype'], a['batch']) == (c['dtype'], c['batch'])
      ),
      3,
    )
    for c in cases
    if c['style'] == 'per_image' and c['form'] == generator_lib.FOLDED_WEIGHTS
  }
  ratios = {
    f'{c["style"]}_vs_per_image': {
      'time': round(c['seconds'] / base['seconds'], 3),
      'peak_memory': round(c['peak_mib'] / base['peak_mib'], 3),
      'arithmetic': round(
        c['mac_per_pixel_done'] / base['mac_per_pixel_done'], 3
      ),
    }
    for c in cases
    if c['style'] != 'per_image'
  }
  print(
    json.dumps(
      {
        'benchmark': 'generator',
        'model': 'CIPSskip-256',
        'machine': {
          'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()],
          'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__,
          'host_malloc_reuse': host_malloc.configured,
        },
        'matmul_4096_f32_gflop_per_s': round(matmul_rate, 2),
        'cases': cases,
        'ratios_at_batch_%d' % biggest: ratios,
        # time of the folded-weight form / the activation form, per case
        'weights_vs_activations_time': forms,
      },
      indent=1,
    )
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  main()
