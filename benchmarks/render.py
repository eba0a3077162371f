"""Rendering any resolution in bounded memory, reported as JSON.

CIPSskip-256 streamed to a big grid.

    python benchmarks/render.py --size=4096        # about 12 min on 2 CPU cores
    python benchmarks/render.py --size=1024 --chunk_size=16384

Builds CIPSskip-256 with the reference's widths (random weights: the cost does
not depend on their values), maps one z, and renders a size x size grid with
`sampling.render` (a host loop over fixed-size pixel chunks). Reports wall time,
pixels/s, and the process's peak resident memory (ru_maxrss) before and after
the render: the issue's target is below 3 GB at 4096^2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax

from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import models
from cips_jax import sampling
from cips_jax import summary


def peak_rss_gb() -> float:
  """Peak resident set size of this process so far (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=4096)
  parser.add_argument('--chunk_size', type=int, default=sampling.RENDER_CHUNK)
  args = parser.parse_args()

  gen = models.CIPSskip(size=256, hidden_size=512, style_dim=512, n_mlp=8)
  variables = jax.jit(lambda key: models.init(gen, key))(jax.random.PRNGKey(0))
  w = sampling.mapping(
    gen, variables, jax.random.normal(jax.random.PRNGKey(1), (1, 512))
  )
  # Compile the chunk program on a small grid first, so the timing is the render
  # alone.
  sampling.render(
    gen, variables, w, grids.uniform(256, 256), chunk_size=args.chunk_size
  )
  before = peak_rss_gb()
  start = time.perf_counter()
  image = sampling.render(
    gen,
    variables,
    w,
    grids.uniform(args.size, args.size),
    chunk_size=args.chunk_size,
    progress=summary.ProgressBar(stream=sys.stderr),
  )
  seconds = time.perf_counter() - start
  print(
    json.dumps(
      {
        'machine': platform.processor() or platform.machine(),
        'cpu_count': os.cpu_count(),
        'backend': jax.default_backend(),
        'device': jax.devices()[0].device_kind,
        'host_malloc_reuse': host_malloc.configured,
        'jax': jax.__version__,
        'model': 'CIPSskip-256 (44.3M parameters)',
        'size': args.size,
        'chunk_size': args.chunk_size,
        'output_shape': list(image.shape),
        'seconds': round(seconds, 1),
        'pixels_per_s': round(args.size**2 / seconds),
        'peak_rss_gb_before_render': round(before, 3),
        'peak_rss_gb': round(peak_rss_gb(), 3),
        'finite': bool(jax.numpy.isfinite(image).all()),
      }
    )
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  main()
