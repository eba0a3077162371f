"""What the benchmark scripts share.

Each script in benchmarks/ is run as `python benchmarks/NAME.py`, so this
directory is on sys.path and the scripts `import common`. They never import
each other: each defines its own absl flags at import, and a second script's
flags would clash with them. So what more than one script measures lives here:
- the command line: `check_no_arguments`, `print_json`, `run_for_json` (a
  script or program in a fresh process);
- the machine: `machine` (the description each JSON document carries),
  `peak_rss_mib`;
- timing: `best_time` and `best_step_time` (best of N after a warm-up call that
  also compiles), XLA's peak memory of a compiled program, `matmul_gflops` (the
  rate every "fraction of the matmul rate" divides by);
- the smoke sizes (`SMOKE_MODEL`, `SMOKE_SIDE`, `train_config(smoke=True)`):
  a tiny model that checks a script runs; its figures mean nothing;
- configs: `load_config` (an experiments/*.py file), `train_config`,
  `prepared_steps`;
- the cases more than one script runs: `generator_case` (a render of one style
  form) and `train_step_case` (the GAN step).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from typing import Any, Callable, NamedTuple

from absl import app
import flax
import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import configs
from cips_jax import generator as generator_lib
from cips_jax import grids
from cips_jax import host_malloc
from cips_jax import parallel
from cips_jax import sampling
from cips_jax import train
from cips_jax import train_state

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)

# CIPSskip-256, counted from the reference architecture
MAC_PER_PIXEL = 3_401_344
# the reference PyTorch step (64x64, batch 8, full width) on the project's
# 2-core machine
REFERENCE_SECONDS_64 = 46.0
USEFUL_TFLOP_64 = 2.9  # useful work of that step (see benchmarks/train.py)

# --smoke: a model 16 wide at 32x32, so that a script's code runs in seconds
# (the tests run it); its figures mean nothing.
SMOKE_MODEL = dict(
  size=32, hidden_size=16, style_dim=16, n_mlp=1, max_channels=16
)
SMOKE_SIDE = 32
SMOKE_WIDTH = 16  # every width of a smoke training config


# The command line.


def check_no_arguments(argv: list[str]) -> None:
  """Refuses arguments besides flags.

  absl reads `--batch_sizes 1 4` as `--batch_sizes=1` and a stray `4`: list
  flags take `--batch_sizes=1,4`.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')


def print_json(
  document: dict[str, Any], out: str | None = None, indent: int | None = 1
) -> None:
  """Prints a benchmark's document; also writes it to the file `out`, if any.

  `indent=None` prints it on one line.
  """
  text = json.dumps(document, indent=indent)
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      f.write(text + '\n')


def run_for_json(
  argv: list[str], timeout: float, last_line: bool = False, **kwargs
) -> Any:
  """Runs a command in a fresh process; the JSON document it printed.

  `last_line`: the document is the last line of its output. Raises
  RuntimeError with the end of its stderr if it fails. `kwargs` go to
  `subprocess.run` (cwd, env).
  """
  result = subprocess.run(
    argv, capture_output=True, text=True, timeout=timeout, **kwargs
  )
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  stdout = (
    result.stdout.strip().splitlines()[-1] if last_line else result.stdout
  )
  return json.loads(stdout)


# The machine.

# What `machine` can describe, each read when asked for: reading the devices
# starts JAX's backend.
_MACHINE = {
  'backend': jax.default_backend,
  'devices': lambda: [str(d) for d in jax.devices()],
  'device_kinds': lambda: [d.device_kind for d in jax.devices()],
  'device_kind': lambda: jax.devices()[0].device_kind,
  'device_count': jax.device_count,
  'processor': lambda: platform.processor() or platform.machine(),
  'cpu_count': os.cpu_count,
  'jax': lambda: jax.__version__,
  'host_malloc_reuse': lambda: host_malloc.configured,
}


def _cpu_model() -> str:
  """The CPU's model name ('AMD EPYC ...', 'Intel(R) Xeon(R) ...'), or ''."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def machine(*entries: str | tuple[str, str]) -> dict[str, Any]:
  """The machine and JAX install a benchmark ran on, in its JSON's words.

  The CPU's model name is always there (`cpu`). Each entry is one of
  `_MACHINE`'s names, or a pair (key, name) that reports
  that name under another key: each script keeps the keys its JSON files
  already have (`('devices', 'device_kinds')` in run_all.py).
  """
  # Always the CPU: the project's machines are of two kinds whose speeds
  # differ about 2x, and a figure must say which made it.
  described = {'cpu': _cpu_model()}
  for entry in entries:
    key, name = (entry, entry) if isinstance(entry, str) else entry
    described[key] = _MACHINE[name]()
  return described


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB.

  Linux reports ru_maxrss in KiB.
  """
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Timing.


def best_time(fn: Callable[..., Any], *args, repeats: int) -> float:
  """Best wall time of `fn(*args)` over `repeats` calls, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def best_step_time(step, state, batch, repeats: int) -> tuple[float, Any]:
  """Best wall time of a train step, after one warm-up; and the last state.

  `step(state, batch)` returns (state, outputs); each call continues from the
  state the last one returned, as training does.
  """

  def call():
    nonlocal state
    state, out = step(state, batch)
    return out

  return best_time(call, repeats=repeats), state


def compiled_peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - aliased buffers of a compiled program.

  As XLA's buffer assignment reports them.
  """
  analysis = compiled.memory_analysis()
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def peak_bytes(jitted, *args) -> int:
  """`compiled_peak_bytes` of a jitted function compiled for `args`."""
  return compiled_peak_bytes(jitted.lower(*args).compile())


def matmul_gflops(
  n: int = 4096, dtype=jnp.float32, precision=None, repeats: int = 3
) -> float:
  """GFLOP/s of an n x n x n `jnp.dot` with `dtype` inputs.

  The products accumulate in float32, at `precision` (XLA's default if None).
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(
    lambda x, y: jnp.dot(
      x, y, precision=precision, preferred_element_type=jnp.float32
    )
  )
  seconds = best_time(dot, a, a, repeats=repeats)
  return 2 * n**3 / seconds / 1e9


# Configs.


def load_config(path: str):
  """`get_config()` of an experiment config file (experiments/*.py)."""
  return configs.from_file(path)


def train_config(
  side: int,
  batch: int,
  remat: bool = False,
  compute_dtype: str = 'float32',
  smoke: bool = False,
):
  """The reference recipe (full widths) at side x side, global batch `batch`.

  `smoke` narrows every width to `SMOKE_WIDTH` and the mapping to one layer.
  """
  config = configs.reference_config()
  config.model.size = side
  config.data.resolution = config.data.crop = side
  config.train.global_batch_size = batch
  config.train.compute_dtype = compute_dtype
  config.train.remat = remat
  if smoke:
    m = config.model
    m.hidden_size = m.style_dim = SMOKE_WIDTH
    m.max_channels = m.d_max_channels = SMOKE_WIDTH
    m.n_mlp = 1
  return config


class BoundStep(NamedTuple):
  """`train.jit_train_step`'s program with its static arguments bound: call it
  or lower it with (state, batch)."""

  jitted: Callable
  static: dict

  def __call__(self, state, batch):
    return self.jitted(state, batch, **self.static)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, **self.static)


def bound_steps(models, state_sharding=None) -> dict[bool, BoundStep]:
  """{with_r1: the step of `models` (`train.StepModels`) jitted over its
  mesh}."""
  jitted = train.jit_train_step(models, state_sharding)
  return {
    with_r1: BoundStep(jitted, {'models': models, 'with_r1': with_r1})
    for with_r1 in (False, True)
  }


def prepared_steps(config):
  """A config's fresh train state, its jitted steps and a random batch.

  Returns (state, {with_r1: step}, global batch), on a mesh of all devices.
  """
  mesh = parallel.make_mesh()
  gen, disc = train_state.build_models(config)
  g_tx, d_tx = train_state.make_optimizers(config)
  state = jax.jit(
    lambda: train_state.create_state(gen, disc, g_tx, d_tx, 0),
    out_shardings=parallel.replicated(mesh),
  )()
  steps = bound_steps(train.step_models(config, gen, disc, g_tx, d_tx, mesh))
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


# Generator cases.


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


def generator_case(
  gen, variables, kind, batch, resolution, repeats, matmul_rate, chunk_size=None
) -> dict[str, Any]:
  """One render of a `resolution`^2 grid with the style form `kind`, timed.

  Seconds (best of `repeats` after compiling), images/s, useful GFLOP/s
  (`MAC_PER_PIXEL`) and its fraction of `matmul_rate`, the MACs per pixel the
  form really does, and XLA's peak memory.
  """
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


# Training cases.


def train_step_case(
  name, config, repeats, matmul_rate, useful_tflop=None
) -> dict[str, Any]:
  """The GAN step without R1 (D step, G step, EMA) of `config`, timed.

  Seconds (best of `repeats` after compiling), steps/s, images/s, XLA's FLOP
  count and peak memory; with `useful_tflop` (TFLOP per step), that work's rate
  as a fraction of `matmul_rate` and the speed-up over the reference's 64x64
  step, else XLA's count as a fraction of `matmul_rate`.
  """
  state, steps, batch = prepared_steps(config)
  step = steps[False]
  b, c = config.train.global_batch_size, config.data.crop
  compiled = step.lower(state, batch).compile()
  flops = compiled.cost_analysis().get('flops', float('nan'))
  peak = compiled_peak_bytes(compiled)
  # Timed as compiled here: calling the jitted step would compile it again.
  seconds, _ = best_step_time(compiled, state, batch, repeats)
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
