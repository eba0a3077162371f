"""Compiles the package's accelerator programs with the real XLA:TPU compiler,
on a CPU: no TPU needed.

    pip install -e '.[tpu]'          # libtpu, the compiler (about 680 MB)
    python benchmarks/tpu_compile.py # every program x target; resumable
    python benchmarks/tpu_compile.py --programs=train_step_churches_bfloat16 \
        --targets=v5e-8
    python benchmarks/tpu_compile.py --ci  # the suite's check (seconds)

For each program and TPU slice (a `jax.experimental.topologies` description
of chips that are not there) the program is jitted over a mesh of the slice's
devices with the package's own shardings, lowered and compiled. Per program
the JSON holds:
- compile seconds (on this machine);
- memory per device from XLA:TPU's `memory_analysis()` (arguments, outputs,
  temporaries, generated code) against the device's HBM;
- FLOPs and bytes accessed per device (`cost_analysis()`), the project's own
  FLOP count of the same program (`product_flops`, from the jaxpr; divided by
  the devices), the roofline time max(FLOPs / peak, bytes / bandwidth) and
  the MFU it implies (the own count's FLOPs over the roofline time, over the
  peak);
- the collectives of the compiled HLO (kind, count, bytes);
- for the fused form, whether Mosaic compiled the Pallas kernel
  (`tpu_custom_call` in the compiled program).

A program that does not compile is reported with its error. Results are
written after every program to --out (default
benchmarks/results/tpu_compile.json); programs already there are skipped, so
an interrupted run resumes (--fresh starts over). --table writes the docs
table (docs/tpu_compile.md) from the JSON.

Peaks and HBM per chip are Google's published figures (cloud.google.com/tpu/
docs/v4, /v5e, /v5p, /v6e; bf16 peak, HBM capacity and bandwidth). A v4 chip
shows as two devices (its two TensorCores) in these topologies, each with half
the chip; v5p's megacore is one device per chip.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# Several processes may hold libtpu at once (the suite runs two workers).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import product_flops  # noqa: E402

from cips_jax import configs  # noqa: E402
from cips_jax import generator as generator_lib  # noqa: E402
from cips_jax import grids  # noqa: E402
from cips_jax import memory_plan  # noqa: E402
from cips_jax import parallel  # noqa: E402
from cips_jax import sampling  # noqa: E402
from cips_jax import shapes  # noqa: E402
from cips_jax import train  # noqa: E402
from cips_jax import train_state  # noqa: E402
from cips_jax.kernels import modulated_dense  # noqa: E402
from cips_jax.metrics import inception  # noqa: E402

_OUT = flags.DEFINE_string(
  'out',
  os.path.join(common.BENCHMARKS, 'results', 'tpu_compile.json'),
  'the JSON to write (and to resume from)',
)
_PROGRAMS = flags.DEFINE_list('programs', [], 'only these programs')
_TARGETS = flags.DEFINE_list('targets', [], 'only these targets')
_FRESH = flags.DEFINE_bool('fresh', False, 'ignore the results in --out')
_TABLE = flags.DEFINE_string(
  'table', '', 'write the markdown table of --out here, then exit'
)
_RECOUNT = flags.DEFINE_bool(
  'recount',
  False,
  "recount the project's FLOPs of every program in --out (tracing only, no "
  'compiling), after a change to product_flops',
)
_CI = flags.DEFINE_bool(
  'ci',
  False,
  "the suite's check: the fused kernel and a small training step with the "
  'churches sharding, on a multi-host v5e slice; prints the JSON',
)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures of one TPU chip."""

  name: str
  peak_bf16_tflops: float
  hbm: str  # capacity, as published
  hbm_gbps: float  # GB/s
  source: str


CHIPS = {
  'v4': Chip('TPU v4', 275.0, '32 GiB', 1200.0, 'cloud.google.com/tpu/docs/v4'),
  'v5e': Chip(
    'TPU v5e', 197.0, '16 GB', 819.0, 'cloud.google.com/tpu/docs/v5e'
  ),
  'v5p': Chip(
    'TPU v5p', 459.0, '95 GB', 2765.0, 'cloud.google.com/tpu/docs/v5p'
  ),
  'v6e': Chip(
    'TPU v6e', 918.0, '32 GB', 1638.0, 'cloud.google.com/tpu/docs/v6e'
  ),
}

# name: (generation, topology). One host's worth of chips (4 or 8), and a
# multi-host slice of 16 chips (32 v4 TensorCores).
TARGETS = {
  'v4-8': ('v4', '2x2x1'),
  'v4-32': ('v4', '2x2x4'),
  'v5e-8': ('v5e', '2x4'),
  'v5e-16': ('v5e', '4x4'),
  'v5p-8': ('v5p', '2x2x1'),
  'v5p-32': ('v5p', '2x2x4'),
  'v6e-8': ('v6e', '2x4'),
  'v6e-16': ('v6e', '4x4'),
}
CI_TARGET = 'v5e-16'


@dataclasses.dataclass
class Slice:
  """A TPU slice that is not there: its devices and their published share."""

  name: str
  chip: Chip
  devices: list
  chips: int

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.chips

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_bf16_tflops * 1e12 / self.devices_per_chip

  @property
  def hbm_bytes_per_s(self) -> float:
    return self.chip.hbm_gbps * 1e9 / self.devices_per_chip


_AVAILABLE = re.compile(r'exceeds available HBM \(([\d.]+)G\)')


def available_hbm_bytes(target: Slice) -> int:
  """The HBM per device that XLA:TPU allocates from, asked of the compiler.

  It is less than the chip's (the runtime keeps a share: 15.75 of a v5e's
  16 GiB); a program that needs more does not compile. The compiler names it
  when refusing a program that needs far more.
  """
  mesh = jax.sharding.Mesh(np.asarray(target.devices[:1]), ('one',))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())

  def oversized(key):
    x = jax.random.uniform(key, (2**36,))  # 256 GiB of temporaries
    return jnp.sum(jnp.sin(x) * jnp.cos(x[::-1]))

  program = jax.jit(oversized, in_shardings=replicated)
  try:
    program.lower(
      jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    ).compile()
  except Exception as error:  # the refusal we asked for
    found = _AVAILABLE.search(str(error))
    if found:
      return round(float(found[1]) * 2**30)
    raise
  raise RuntimeError(f'{target.name}: a 256 GiB program compiled')


def tpu_slice(name: str) -> Slice:
  """The devices of target `name` (see TARGETS), from libtpu's topology."""
  from jax.experimental import topologies

  generation, topology = TARGETS[name]
  described = topologies.get_topology_desc(
    platform='tpu', topology_name=f'{generation}:{topology}'
  )
  chips = math.prod(int(n) for n in topology.split('x'))
  return Slice(name, CHIPS[generation], list(described.devices), chips)


# ------------------------------------------------------------------------------
# The programs: (jitted function, abstract arguments) over a slice's mesh.


@dataclasses.dataclass
class Program:
  fn: Callable
  args: tuple
  notes: dict


def _sharded(tree, sharding):
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def train_step(config, mesh, with_r1: bool, per_device_batch: int) -> Program:
  """The training step of `config` at `per_device_batch` images per device."""
  batch_size = per_device_batch * mesh.size
  config.train.global_batch_size = batch_size
  models, state, batch, shardings = train.abstract_step(
    config, mesh, batch_size
  )
  steps = common.bound_steps(models, shardings)
  parameter_bytes = sum(
    x.size * x.dtype.itemsize
    for x in jax.tree_util.tree_leaves((state.g_params, state.d_params))
  )
  return Program(
    steps[with_r1],
    (state, batch),
    {
      'parameter_bytes': parameter_bytes,
      'planned_bytes': memory_plan.plan(config, mesh.size).total_bytes,
      'global_batch': batch_size,
      'per_device_batch': per_device_batch,
      'compute_dtype': config.train.compute_dtype,
      'per_image_form': config.train.per_image_form,
      'remat': bool(config.train.remat),
      'r1': with_r1,
    },
  )


def generation(config, mesh, form: str, per_device_batch: int) -> Program:
  """Per-image generation at the config's side, the batch over 'data'."""
  config.train.per_image_form = form
  gen, _, _, _, state = train_state.abstract_state(config)
  side = config.data.crop
  coords = grids.uniform(side, side)
  batch_size = per_device_batch * mesh.size
  replicated, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def generate(variables, z):
    with parallel.tracing_over(mesh):  # the fused kernel splits itself
      return sampling.generate(gen, variables, z, coords)

  program = jax.jit(
    generate, in_shardings=(replicated, split), out_shardings=split
  )
  args = (
    _sharded({'params': state.ema_params}, replicated),
    jax.ShapeDtypeStruct(
      (batch_size, gen.style_dim), jnp.float32, sharding=split
    ),
  )
  return Program(
    program,
    args,
    {
      'global_batch': batch_size,
      'per_device_batch': per_device_batch,
      'compute_dtype': config.train.compute_dtype,
      'form': form,
    },
  )


def discriminator_step(config, mesh, conv_impl: str, per_device_batch: int):
  """D's forward and backward on real and fake images in one conv form."""
  _, disc, _, _, state = train_state.abstract_state(config)
  disc = disc.clone(conv_impl=conv_impl)
  side = config.data.crop
  batch_size = per_device_batch * mesh.size
  replicated, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def gradient(params, real, fake):
    def loss(params):
      with parallel.tracing_over(mesh):
        real_logits = disc.apply({'params': params}, real)
        fake_logits = disc.apply({'params': params}, fake)
      return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(
        jax.nn.softplus(fake_logits)
      )

    return jax.grad(loss)(params)

  image = jax.ShapeDtypeStruct(
    (batch_size, side, side, 3), jnp.float32, sharding=split
  )
  program = jax.jit(
    gradient, in_shardings=(replicated, split, split), out_shardings=replicated
  )
  return Program(
    program,
    (_sharded(state.d_params, replicated), image, image),
    {
      'global_batch': batch_size,
      'conv_impl': conv_impl,
      'compute_dtype': config.train.compute_dtype,
    },
  )


def render_chunk(config, mesh, pixels_per_device: int) -> Program:
  """`sampling.render`'s chunk program: one image's pixels over 'data'."""
  gen, _, _, _, state = train_state.abstract_state(config)
  pixels = pixels_per_device * mesh.size
  w = jax.ShapeDtypeStruct((1, gen.style_dim), jnp.float32)
  coords = jax.ShapeDtypeStruct((pixels, 2), jnp.float32)
  chunk = shapes.parse(w, coords).chunk(pixels)
  program = sampling.chunk_renderer(gen, None, mesh, chunk, False)
  return Program(
    program,
    ({'params': state.ema_params}, w, coords, None, None),
    {'pixels': pixels, 'compute_dtype': config.train.compute_dtype},
  )


def inception_features(mesh, per_device_batch: int, side: int) -> Program:
  """The FID feature program: uint8 images over 'data'."""
  params = jax.eval_shape(
    lambda: inception.InceptionV3().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))
    )['params']
  )
  images = jax.ShapeDtypeStruct(
    (per_device_batch * mesh.size, side, side, 3),
    jnp.uint8,
    sharding=parallel.batch_sharded(mesh),
  )
  return Program(
    inception.feature_program(mesh),
    (_sharded(params, parallel.replicated(mesh)), images),
    {'global_batch': per_device_batch * mesh.size},
  )


def fused_layer(mesh, per_device_batch, pixels, fan_in, fan_out) -> Program:
  """One fused Pallas layer (Mosaic) on the images of each device."""
  batch_size = per_device_batch * mesh.size
  split = parallel.batch_sharded(mesh)
  replicated = parallel.replicated(mesh)

  def layer(x, kernel, scale, inv_norm, bias):
    def local(x, kernel, scale, inv_norm, bias):
      return modulated_dense.fused_styled_dense(
        x, kernel, scale, inv_norm, bias, backend='tpu'
      )

    # As the generator calls it under a jit over a mesh (fused_pixel).
    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(
        jax.P(parallel.DATA_AXIS),
        jax.P(),
        jax.P(parallel.DATA_AXIS),
        jax.P(parallel.DATA_AXIS),
        jax.P(),
      ),
      out_specs=jax.P(parallel.DATA_AXIS),
      check_vma=False,
    )(x, kernel, scale, inv_norm, bias)

  args = (
    jax.ShapeDtypeStruct(
      (batch_size, pixels, fan_in), jnp.bfloat16, sharding=split
    ),
    jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32, sharding=replicated),
    jax.ShapeDtypeStruct((batch_size, fan_in), jnp.float32, sharding=split),
    jax.ShapeDtypeStruct((batch_size, fan_out), jnp.float32, sharding=split),
    jax.ShapeDtypeStruct((fan_out,), jnp.float32, sharding=replicated),
  )
  return Program(
    jax.jit(layer),
    args,
    {
      'global_batch': batch_size,
      'pixels': pixels,
      'fan_in': fan_in,
      'fan_out': fan_out,
    },
  )


def experiment(name: str):
  """experiments/NAME.py's config."""
  return common.load_config(
    os.path.join(common.REPO, 'experiments', f'{name}.py')
  )


def churches(dtype: str, form: str = generator_lib.MODULATED_ACTIVATIONS):
  """experiments/churches.py in `dtype`, its per-image styles in `form` (the
  rows were first compiled with activations, 'auto''s TPU choice then; it
  folds weights since, on the evidence of the '_weights' row)."""
  config = experiment('churches')
  config.train.compute_dtype = dtype
  config.train.per_image_form = form
  return config


def _with_remat(config):
  config.train.remat = True
  return config


# Per-device batches: churches' global 32 over the 8 devices it documents.
CHURCHES_PER_DEVICE = 4
GENERATION_PER_DEVICE = 8


def _other_step(name: str, remat: bool = False, dtype: str = '') -> Callable:
  def build(mesh):
    config = experiment(name)
    # As churches(): the form these rows were compiled with.
    config.train.per_image_form = generator_lib.MODULATED_ACTIVATIONS
    per_device = max(config.train.global_batch_size // 8, 1)
    if dtype:
      config.train.compute_dtype = dtype
    return train_step(
      _with_remat(config) if remat else config, mesh, False, per_device
    )

  return build


PROGRAMS: dict[str, Callable[[Any], Program]] = {
  **{
    f'train_step_churches_{dtype}' + ('_r1' if r1 else ''): (
      lambda mesh, dtype=dtype, r1=r1: train_step(
        churches(dtype), mesh, r1, CHURCHES_PER_DEVICE
      )
    )
    for dtype in ('float32', 'bfloat16')
    for r1 in (False, True)
  },
  # The per-image style folded into each image's weights: the evidence for
  # 'auto' on TPUs, beside the default (activations) form above.
  'train_step_churches_bfloat16_weights': lambda mesh: train_step(
    churches('bfloat16', generator_lib.FOLDED_WEIGHTS),
    mesh,
    False,
    CHURCHES_PER_DEVICE,
  ),
  # The remedy where bfloat16 alone does not fit: recompute G's layers.
  'train_step_churches_bfloat16_remat': lambda mesh: train_step(
    _with_remat(churches('bfloat16')), mesh, False, CHURCHES_PER_DEVICE
  ),
  **{
    f'generate_{form}_bfloat16': (
      lambda mesh, form=form: generation(
        churches('bfloat16'), mesh, form, GENERATION_PER_DEVICE
      )
    )
    for form in generator_lib.PER_IMAGE_FORMS[:3]
  },
  **{
    f'discriminator_step_{impl}_bfloat16': (
      lambda mesh, impl=impl: discriminator_step(
        churches('bfloat16'), mesh, impl, CHURCHES_PER_DEVICE
      )
    )
    for impl in ('xla', 'im2col')
  },
  'render_chunk_bfloat16': lambda mesh: render_chunk(
    churches('bfloat16'), mesh, 4096
  ),
  'inception_features': lambda mesh: inception_features(mesh, 8, 256),
  # ffhq256 and ffhq1024 train the churches programs (same model and crop;
  # ffhq1024 in bfloat16).
  **{
    f'train_step_{name}': _other_step(name)
    for name in ('landscapes', 'panorama', 'emoji', 'quickstart')
  },
  # CIPSres-256 in float32 does not fit a v5e chip as shipped.
  'train_step_landscapes_remat': _other_step('landscapes', remat=True),
  'train_step_landscapes_bfloat16': _other_step('landscapes', dtype='bfloat16'),
}


# The order of a full run: the churches rows first (a run cut short has them),
# then the programs that compile in seconds, then the slow steps.
_FIRST = (
  'train_step_churches_bfloat16',
  'generate_fused_bfloat16',
  'generate_activations_bfloat16',
  'generate_weights_bfloat16',
  'train_step_churches_float32',
  'render_chunk_bfloat16',
  'inception_features',
  'train_step_quickstart',
  'train_step_emoji',
  'train_step_panorama',
  'train_step_churches_bfloat16_r1',
  'train_step_churches_float32_r1',
)
PROGRAMS = {
  **{name: PROGRAMS[name] for name in _FIRST},
  **{k: v for k, v in PROGRAMS.items() if k not in _FIRST},
}

# Programs that compare two forms of one program answer their question on the
# slices named here (the smallest HBM, v5e's; the D forms also on v6e); the
# others run on every target.
ONLY_ON = {
  'train_step_churches_bfloat16_weights': ('v5e-8',),
  'train_step_churches_bfloat16_remat': ('v5e-8',),
  'discriminator_step_xla_bfloat16': ('v5e-8', 'v6e-8'),
  'discriminator_step_im2col_bfloat16': ('v5e-8', 'v6e-8'),
  'train_step_landscapes_remat': ('v5e-8',),
  'train_step_landscapes_bfloat16': ('v5e-8',),
}


def targets_of(program: str) -> tuple[str, ...]:
  """The slices `program` is compiled for."""
  return ONLY_ON.get(program, tuple(TARGETS))


# ------------------------------------------------------------------------------
# Compiling and reading the compiled program.

# One collective per line: '%name = SHAPE all-reduce(...' (SHAPE may be a
# tuple); async ones as their '-start' half.
_COLLECTIVE = re.compile(
  r'^\s*(?:ROOT\s+)?%\S+ = (?P<shape>.+?) (?P<op>all-reduce|all-gather|'
  r'reduce-scatter|all-to-all|collective-permute)(?:-start)?\(',
  re.MULTILINE,
)
_ARRAY = re.compile(r'([a-z]+\d*)\[([\d,]*)\]')
_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'bf16': 2,
  'f16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives of a compiled HLO text."""
  found: dict[str, dict[str, int]] = {}
  for match in _COLLECTIVE.finditer(hlo):
    size = 0
    for dtype, dims in _ARRAY.findall(match['shape']):
      if dtype in _BYTES:
        size += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
    entry = found.setdefault(match['op'], {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += size
  return found


def compile_program(program: Program, target: Slice) -> dict[str, Any]:
  """Lowers and compiles `program`; its properties (see the module doc)."""
  start = time.perf_counter()
  own_flops = own_count(program, target)
  lowered = program.fn.lower(*program.args)
  lowered_s = time.perf_counter() - start
  start, start_cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  compile_cpu_s = time.process_time() - start_cpu
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0]
  hlo = compiled.as_text()
  per_device = {
    'arguments': memory.argument_size_in_bytes,
    'outputs': memory.output_size_in_bytes,
    'aliased': memory.alias_size_in_bytes,
    'temporaries': memory.temp_size_in_bytes,
    'code': memory.generated_code_size_in_bytes,
  }
  # Donated arguments share their buffers with the outputs.
  total = (
    per_device['arguments']
    + per_device['outputs']
    - per_device['aliased']
    + per_device['temporaries']
    + per_device['code']
  )
  flops = float(cost.get('flops', 0.0))
  bytes_accessed = float(cost.get('bytes accessed', 0.0))
  roofline_s = max(
    flops / target.peak_flops, bytes_accessed / target.hbm_bytes_per_s
  )
  found = {
    **program.notes,
    'lower_seconds': round(lowered_s, 1),
    'compile_seconds': round(compile_s, 1),
    # The compiler's own time: the wall time is not, where it shared a core
    # or was paused (the table shows this one).
    'compile_cpu_seconds': round(compile_cpu_s, 1),
    'memory_bytes': per_device,
    'memory_total_bytes': total,
    'flops': flops,
    'bytes_accessed': bytes_accessed,
    'roofline_seconds': roofline_s,
    'bound': 'compute'
    if flops / target.peak_flops >= bytes_accessed / target.hbm_bytes_per_s
    else 'memory',
    'collectives': collectives(hlo),
    'mosaic_kernels': hlo.count('custom_call_target="tpu_custom_call"'),
  }
  return {**found, **counted(found, own_flops, target)}


def own_count(program: Program, target: Slice) -> float:
  """The project's FLOP count of `program` per device (see product_flops)."""
  jaxpr = jax.make_jaxpr(program.fn)(*program.args)
  return product_flops.count(jaxpr) / len(target.devices)


def counted(found: dict, own_flops: float, target: Slice) -> dict:
  """The fields that follow from the own count: its ratio to XLA's, and the
  MFU at the roofline time (useful FLOPs over time, over the peak)."""
  roofline_s = found['roofline_seconds']
  return {
    'own_flops': own_flops,
    'flops_ratio': round(found['flops'] / own_flops, 4) if own_flops else None,
    'roofline_mfu': round(own_flops / roofline_s / target.peak_flops, 4)
    if roofline_s
    else None,
  }


def compile_or_error(build, target: Slice) -> dict[str, Any]:
  mesh = parallel.make_mesh(target.devices)
  try:
    return compile_program(build(mesh), target)
  except Exception as error:  # a finding: reported in the table
    first = str(error).strip().splitlines()[0] if str(error) else ''
    return {'error': f'{type(error).__name__}: {first}'[:500]}


def describe_target(target: Slice) -> dict[str, Any]:
  return {
    'chip': target.chip.name,
    'chips': target.chips,
    'devices': len(target.devices),
    'hosts': target.hosts,
    'hbm_per_chip': target.chip.hbm,
    'available_hbm_bytes': available_hbm_bytes(target),
    'peak_bf16_tflops_per_device': target.peak_flops / 1e12,
    'hbm_gbps_per_device': target.hbm_bytes_per_s / 1e9,
    'source': target.chip.source,
    'programs': {},
  }


# ------------------------------------------------------------------------------
# The suite's check: seconds, not the full programs.


# The suite's programs: the churches sharding (replicated state, batch over
# 'data') on small models that compile in seconds.
def ci_programs() -> dict[str, Callable]:
  def small(width: int, side: int):
    config = configs.reference_config()
    m = config.model
    m.size, m.hidden_size, m.style_dim, m.n_mlp = side, width, width, 2
    m.max_channels = m.d_max_channels = width
    config.data.resolution = config.data.crop = side
    config.train.compute_dtype = 'bfloat16'
    return config

  return {
    'fused_layer_512_512': lambda mesh: fused_layer(mesh, 2, 4096, 512, 512),
    # The fused form as the generator calls it under a sharded jit.
    'generate_fused_small_bfloat16': lambda mesh: generation(
      small(128, 16), mesh, 'fused', 2
    ),
    'train_step_small_bfloat16': lambda mesh: train_step(
      small(128, 8), mesh, False, 2
    ),
  }


def run(programs, target_names, out_path: Optional[str]) -> dict:
  results = {
    'machine': common.machine('cpu_count', 'jax'),
    'libtpu': importlib.metadata.version('libtpu'),
    'targets': {},
  }
  if out_path and os.path.exists(out_path) and not _FRESH.value:
    with open(out_path) as f:
      results['targets'] = json.load(f).get('targets', {})
  slices = {name: tpu_slice(name) for name in target_names}
  # Program by program over every target: a run cut short has whole rows.
  for program, build in programs.items():
    for name, target in slices.items():
      entry = results['targets'].setdefault(name, describe_target(target))
      if program in entry['programs'] or name not in targets_of(program):
        continue
      print(f'{name} {program} ...', file=sys.stderr, flush=True)
      entry['programs'][program] = compile_or_error(build, target)
      with_capacity(results)
      if out_path:
        results = _merged_write(out_path, results, name, program)
  return results


def with_capacity(results: dict) -> dict:
  """Sets each compiled program's 'hbm_bytes' (the compiler's available HBM
  per device) and 'fits', probing the targets that lack the figure."""
  for name, entry in results['targets'].items():
    entry.pop('hbm_gib_per_device', None)  # runs before this figure existed
    entry['hbm_per_chip'] = CHIPS[TARGETS[name][0]].hbm
    if 'available_hbm_bytes' not in entry:
      entry['available_hbm_bytes'] = available_hbm_bytes(tpu_slice(name))
    for found in entry['programs'].values():
      if 'memory_total_bytes' in found:
        found['hbm_bytes'] = entry['available_hbm_bytes']
        found['fits'] = found['memory_total_bytes'] <= found['hbm_bytes']
  return results


def recount(path: str) -> None:
  """Recomputes the own-count fields of the compiled programs in `path`
  (those of --programs and --targets, if given)."""
  with open(path) as f:
    results = json.load(f)
  for name, entry in results['targets'].items():
    if _TARGETS.value and name not in _TARGETS.value:
      continue
    target = tpu_slice(name)
    mesh = parallel.make_mesh(target.devices)
    for program, found in entry['programs'].items():
      if 'error' in found or program not in PROGRAMS:
        continue
      if _PROGRAMS.value and program not in _PROGRAMS.value:
        continue
      own = own_count(PROGRAMS[program](mesh), target)
      found.update(counted(found, own, target))
  _write(path, with_capacity(results))


def _write(path: str, results: dict) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1)
  os.replace(tmp, path)


def _merged_write(path: str, results: dict, target: str, program: str):
  """Adds one program's result to the file as it is now (another run may have
  added others meanwhile: runs for different programs can share --out)."""
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(path):
      with open(path) as f:
        on_disk = json.load(f)
      for name, entry in results['targets'].items():
        saved = on_disk['targets'].setdefault(name, entry)
        saved['programs'].update(
          {
            k: v
            for k, v in entry['programs'].items()
            if k not in saved['programs']
          }
        )
      on_disk['targets'][target]['programs'][program] = results['targets'][
        target
      ]['programs'][program]
      on_disk.update({k: v for k, v in results.items() if k != 'targets'})
      results = on_disk
    _write(path, results)
  return results


def main(argv):
  common.check_no_arguments(argv)
  if _TABLE.value:
    with open(_OUT.value) as f:
      results = with_capacity(json.load(f))
    write_table(_TABLE.value, markdown_table(results))
    return
  if _RECOUNT.value:
    recount(_OUT.value)
    return
  if _CI.value:
    results = run(ci_programs(), [CI_TARGET], None)
    common.print_json(results)
    return
  programs = {
    k: v
    for k, v in PROGRAMS.items()
    if not _PROGRAMS.value or k in _PROGRAMS.value
  }
  targets = [t for t in TARGETS if not _TARGETS.value or t in _TARGETS.value]
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  run(programs, targets, _OUT.value)


# ------------------------------------------------------------------------------
# The docs table.


# The generated part of the docs page starts here; what is above it (the
# findings, written by hand) is kept.
TABLE_MARKER = '<!-- generated by benchmarks/tpu_compile.py --table -->'


def write_table(path: str, table: str) -> None:
  """Writes `table` below TABLE_MARKER in `path`, keeping what is above."""
  above = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if TABLE_MARKER in text:
      above = text[: text.index(TABLE_MARKER)]
  with open(path, 'w') as f:
    f.write(f'{above}{TABLE_MARKER}\n\n{table}')


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def markdown_table(results: dict) -> str:
  """docs/tpu_compile.md: the slices, then one table per program."""
  machine = results['machine']
  lines = [
    '# Compiled for TPUs, on a CPU',
    '',
    "Every row: the program jitted over the slice with the package's own "
    'shardings and compiled by XLA:TPU (libtpu '
    f'{results["libtpu"]}, jax {machine["jax"]}) on a {machine["cpu"]} with '
    f'{machine["cpu_count"]} cores, no TPU: `python benchmarks/tpu_compile.py` '
    '(resumable; the JSON is benchmarks/results/tpu_compile.json), then '
    '`python benchmarks/tpu_compile.py --table=docs/tpu_compile.md`. '
    "Compile seconds are that CPU's wall time; "
    'in parentheses where the compile ran beside other work '
    'or was paused, so that the wall time is not the compiler\'s. "On 1 '
    'core": the compiler\'s CPU time in a run pinned to one core (its '
    "wall time alone on that core, whatever else ran). Memory is XLA:TPU's "
    '`memory_analysis()` per device: arguments + outputs not aliased to '
    'them + temporaries + code, against the device\'s HBM; "plan" is '
    "`memory_plan.plan`'s estimate from shapes. TFLOP is XLA:TPU's "
    '`cost_analysis()` per device; "own" its ratio to the project\'s count '
    'of the products in the jaxpr (benchmarks/product_flops.py). The '
    'roofline time is max(FLOPs / peak, bytes accessed / HBM bandwidth) and '
    'MFU the own count over that time, over the peak: an upper bound, not a '
    'measurement. "Of HBM" is the share of what XLA allocates from (the '
    "chip less the runtime's share; XLA refuses a program that needs more). "
    'Collectives: kind, count and bytes per device of the '
    'compiled program. Mosaic: Pallas kernels compiled.',
    '',
    '| target | chip | chips | devices | hosts | HBM / chip | XLA '
    'allocates / device | bf16 peak / device | HBM bandwidth / device '
    '| source |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  targets = {
    name: results['targets'].get(name) or describe_target(tpu_slice(name))
    for name in TARGETS
  }
  for name, t in targets.items():
    lines.append(
      f'| {name} | {t["chip"]} | {t["chips"]} | {t["devices"]} | '
      f'{t["hosts"]} | {t["hbm_per_chip"]} | '
      f'{t["available_hbm_bytes"] / 2**30:.2f} GiB | '
      f'{t["peak_bf16_tflops_per_device"]:.1f} TFLOP/s | '
      f'{t["hbm_gbps_per_device"]:.0f} GB/s | {t["source"]} |'
    )
  programs = list(PROGRAMS)
  for t in targets.values():
    programs += [p for p in t['programs'] if p not in programs]
  for program in programs:
    lines += [
      '',
      f'### {program}',
      '',
      '| target | batch | compile s | memory GiB (args + out + temp) | of HBM '
      '| plan | TFLOP | own | roofline ms | MFU | collectives | Mosaic |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    if program in ONLY_ON:
      lines[-2:-2] = [
        f'Compiled for {", ".join(ONLY_ON[program])} only: it compares forms '
        'of one program, a question the smallest HBM answers.',
        '',
      ]
    for name, t in targets.items():
      r = t['programs'].get(program)
      if r is None and name not in targets_of(program):
        continue
      if r is None:
        lines.append(f'| {name} | not compiled yet | | | | | | | | | | |')
      elif 'error' in r:
        lines.append(
          f'| {name} | | | **does not compile**: {r["error"][:200]} '
          '| | | | | | | | |'
        )
      else:
        lines.append(_program_row(name, r))
  return '\n'.join(lines) + '\n'


def _compile_seconds(r: dict) -> str:
  # The compiler's own CPU time where recorded; else the wall time, in
  # parentheses where it is not the compiler's (paused, or sharing a core).
  if 'compile_cpu_seconds' in r:
    return f'{r["compile_cpu_seconds"]:.0f} on 1 core'
  seconds = f'{r["compile_seconds"]:.0f}'
  return f'({seconds})' if r.get('compile_seconds_unreliable') else seconds


def _program_row(name: str, r: dict) -> str:
  m = r['memory_bytes']
  share = r['memory_total_bytes'] / r['hbm_bytes']
  plan = _gib(r['planned_bytes']) if r.get('planned_bytes') is not None else ''
  reduced = ', '.join(
    f'{k} ×{v["count"]} ({v["bytes"] / 2**20:.0f} MiB)'
    for k, v in sorted(r['collectives'].items())
  )
  batch = r.get('global_batch', r.get('pixels', ''))
  return (
    f'| {name} | {batch} | {_compile_seconds(r)} '
    f'| {_gib(r["memory_total_bytes"])} ({_gib(m["arguments"])} + '
    f'{_gib(m["outputs"] - m["aliased"])} + {_gib(m["temporaries"])}) '
    f'| {share:.0%}{"" if r["fits"] else " **over**"} | {plan} '
    f'| {r["flops"] / 1e12:.3f} | {r["flops_ratio"]:.2f}× '
    f'| {r["roofline_seconds"] * 1e3:.1f} ({r["bound"]}) '
    f'| {r["roofline_mfu"]:.0%} | {reduced or "none"} '
    f'| {r["mosaic_kernels"] or ""} |'
  )


if __name__ == '__main__':
  app.run(main)
