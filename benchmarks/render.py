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

import sys
import time

from absl import app
from absl import flags
import common
import jax

from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import models
from cips_jax import progress as progress_lib
from cips_jax import sampling

_SIZE = flags.DEFINE_integer('size', 4096, 'the grid side')
_CHUNK_SIZE = flags.DEFINE_integer(
  'chunk_size', sampling.RENDER_CHUNK, 'pixels per compiled chunk'
)


def main(argv) -> None:
  common.check_no_arguments(argv)
  size, chunk_size = _SIZE.value, _CHUNK_SIZE.value
  gen = models.CIPSskip(size=256, hidden_size=512, style_dim=512, n_mlp=8)
  variables = jax.jit(lambda key: models.init(gen, key))(jax.random.PRNGKey(0))
  w = sampling.mapping(
    gen, variables, jax.random.normal(jax.random.PRNGKey(1), (1, 512))
  )
  # Compile the chunk program on a small grid first, so the timing is the render
  # alone.
  sampling.render(
    gen, variables, w, grids.uniform(256, 256), chunk_size=chunk_size
  )
  before = common.peak_rss_mib() / 1024
  start = time.perf_counter()
  image = sampling.render(
    gen,
    variables,
    w,
    grids.uniform(size, size),
    chunk_size=chunk_size,
    progress=progress_lib.ProgressBar(stream=sys.stderr),
  )
  seconds = time.perf_counter() - start
  common.print_json(
    {
      **common.machine(
        ('machine', 'processor'),
        'cpu_count',
        'backend',
        ('device', 'device_kind'),
        'host_malloc_reuse',
        'jax',
      ),
      'model': 'CIPSskip-256 (44.3M parameters)',
      'size': size,
      'chunk_size': chunk_size,
      'output_shape': list(image.shape),
      'seconds': round(seconds, 1),
      'pixels_per_s': round(size**2 / seconds),
      'peak_rss_gb_before_render': round(before, 3),
      'peak_rss_gb': round(common.peak_rss_mib() / 1024, 3),
      'finite': bool(jax.numpy.isfinite(image).all()),
    },
    indent=None,  # one line
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  app.run(main)
