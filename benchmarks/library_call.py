"""The library's documented calls, made the README's way, vs the best path.

    python benchmarks/library_call.py          # CIPSskip-256, 256x256, batch 1
    python benchmarks/library_call.py --smoke  # a tiny model: checks it runs

Each path runs in a fresh Python process (as a user's script or notebook would):
- `readme`: `sampling.generate`, `sampling.synthesize` and `sampling.render`
  called as the README's library example calls them, with no set-up of any kind
  (glibc's default malloc);
- `best`: the fastest path we know on this machine:
  `host_malloc.reuse_freed_memory()` at the start, then one `jax.jit` of the
  generator's `apply`, written by hand.
For each call: the first call's seconds (compilation included) and the best of
the next `--repeats` calls. `fraction_of_best` = best seconds of the path / the
README call's best seconds (1.0 = as fast as the best path). One JSON document
is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL_MODEL = (
  'size=256, hidden_size=512, style_dim=512, n_mlp=8, lr_mlp=0.01, '
  'channel_multiplier=2'
)
SMOKE_MODEL = 'size=16, hidden_size=16, style_dim=16, n_mlp=1, max_channels=16'

_COMMON = """
import json, sys, time
{setup}
import jax
from cips_jax import grids, models, sampling

gen = models.CIPSskip({model})
variables = models.init(gen, jax.random.key(0))
z = jax.random.normal(jax.random.key(1), (1, gen.style_dim))
coords = grids.uniform({side}, {side})


def timed(call, repeats):
  times = []
  for _ in range(1 + repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return {{
      'first_call_s': round(times[0], 4),
      'best_s': round(min(times[1:]), 4),
  }}

"""

_README = (
  _COMMON
  + """
w = sampling.mapping(gen, variables, z)
results = {{
    'generate': timed(
        lambda: sampling.generate(gen, variables, z, coords), {repeats}
    ),
    'synthesize': timed(
        lambda: sampling.synthesize(gen, variables, w, coords), {repeats}
    ),
    'render': timed(
        lambda: sampling.render(gen, variables, w, coords), {repeats}
    ),
}}
print(json.dumps(results))
"""
)

_BEST = (
  _COMMON
  + """
generate = jax.jit(
    lambda v, z: gen.apply(v, z, coords, method=type(gen).generate)
)
print(json.dumps({{'generate': timed(lambda: generate(variables, z), {repeats}),
                  'host_malloc_reuse': host_malloc.configured}}))
"""
)


def run_child(source: str) -> dict:
  env = dict(os.environ)
  env.pop('CIPS_JAX_SYSTEM_MALLOC', None)
  result = subprocess.run(
    [sys.executable, '-c', source],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--smoke', action='store_true', help='a tiny model at 16x16'
  )
  args = parser.parse_args()
  fill = dict(
    model=SMOKE_MODEL if args.smoke else FULL_MODEL,
    side=16 if args.smoke else 256,
    repeats=1 if args.smoke else args.repeats,
  )
  readme = run_child(textwrap.dedent(_README.format(setup='', **fill)))
  setup = 'from cips_jax import host_malloc\nhost_malloc.reuse_freed_memory()'
  best = run_child(textwrap.dedent(_BEST.format(setup=setup, **fill)))
  best_s = best['generate']['best_s']
  for call in readme.values():
    call['fraction_of_best'] = round(best_s / call['best_s'], 3)
  print(
    json.dumps(
      {
        'benchmark': 'library_call',
        'smoke': args.smoke,
        'model': 'CIPSskip (tiny)' if args.smoke else 'CIPSskip-256',
        'resolution': fill['side'],
        'batch': 1,
        'machine': {
          'processor': platform.processor() or platform.machine(),
          'cpu_count': os.cpu_count(),
        },
        'readme_calls': readme,
        'best_path': best,
      },
      indent=1,
    )
  )


if __name__ == '__main__':
  main()
