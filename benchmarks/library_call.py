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

import os
import sys
import textwrap

from absl import app
from absl import flags
import common

_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed calls after the first')
_SMOKE = flags.DEFINE_boolean('smoke', False, 'a tiny model at 16x16')

FULL_MODEL = (
  'size=256, hidden_size=512, style_dim=512, n_mlp=8, lr_mlp=0.01, '
  'channel_multiplier=2'
)
# The smoke model at 16x16: the children build it from this source text.
SMOKE_MODEL = ', '.join(
  f'{key}={value}' for key, value in {**common.SMOKE_MODEL, 'size': 16}.items()
)

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
  """Runs Python `source` in a fresh process; the JSON line it printed last.

  With glibc's malloc settings unless `source` changes them.
  """
  env = dict(os.environ)
  env.pop('CIPS_JAX_SYSTEM_MALLOC', None)
  return common.run_for_json(
    [sys.executable, '-c', source],
    timeout=1800,
    last_line=True,
    cwd=common.REPO,
    env=env,
  )


def main(argv):
  common.check_no_arguments(argv)
  smoke = _SMOKE.value
  fill = dict(
    model=SMOKE_MODEL if smoke else FULL_MODEL,
    side=16 if smoke else 256,
    repeats=1 if smoke else _REPEATS.value,
  )
  readme = run_child(textwrap.dedent(_README.format(setup='', **fill)))
  setup = 'from cips_jax import host_malloc\nhost_malloc.reuse_freed_memory()'
  best = run_child(textwrap.dedent(_BEST.format(setup=setup, **fill)))
  best_s = best['generate']['best_s']
  for call in readme.values():
    call['fraction_of_best'] = round(best_s / call['best_s'], 3)
  common.print_json(
    {
      'benchmark': 'library_call',
      'smoke': smoke,
      'model': 'CIPSskip (tiny)' if smoke else 'CIPSskip-256',
      'resolution': fill['side'],
      'batch': 1,
      'machine': common.machine('processor', 'cpu_count'),
      'readme_calls': readme,
      'best_path': best,
    }
  )


if __name__ == '__main__':
  # No reuse_freed_memory() here: each path sets up its own child process.
  app.run(main)
