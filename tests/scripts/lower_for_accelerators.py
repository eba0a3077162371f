"""Lowers the package's accelerator programs for 'cuda' and 'tpu' on a CPU.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/lower_for_accelerators.py OUT.json

Lowering only (`jax.export`), nothing compiles: the training step at the real
shapes of experiments/churches.py (CIPSskip-256, global batch 32) over a mesh
of the 8 simulated devices, in float32 and in bfloat16 with R1;
generation in every per-image form; `sampling.render`'s chunk program; the
Inception feature program; the fused Pallas layer at the churches widths.
Writes {program: {platform: properties or {'error': ...}}} (see
tests/lowering.py) and the seconds each took.
"""

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from cips_jax import configs
from cips_jax import grids
from cips_jax import parallel
from cips_jax import platforms
from cips_jax import sampling
from cips_jax import shapes
from cips_jax import train
from cips_jax import train_state
from cips_jax.kernels import modulated_dense
from cips_jax.metrics import inception

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import lowering  # noqa: E402

PLATFORMS = ('cuda', 'tpu')
BACKEND_OF_PLATFORM = {'cuda': 'gpu', 'tpu': 'tpu'}
# Pallas's Triton kernels have no serialisation guarantee; lowering is all we
# ask of them here.
TRITON = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
SIDE, BATCH = 256, 32  # experiments/churches.py


def abstract(tree, sharding=None):
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def lower(fn, *args, targets=PLATFORMS, per_platform_trace=False, static=None):
  """{platform: properties} of the jitted `fn` at abstract `args` (and its
  static keyword arguments `static`).

  `per_platform_trace`: trace `fn` anew for each platform, with that
  platform's choices only (`platforms.exporting_for`); else one trace holds
  every platform's choices, staged, and each lowering keeps its own.
  """
  results = {}
  for platform in targets:
    start = time.perf_counter()
    backend = BACKEND_OF_PLATFORM[platform] if per_platform_trace else None
    try:
      if per_platform_trace:
        jax.clear_caches()  # jax's trace caches do not know the setting
      with platforms.exporting_for(backend):
        exported = jax.export.export(
          fn, platforms=[platform], disabled_checks=[TRITON]
        )(*args, **(static or {}))
      mlir = exported.mlir_module()
      report = lowering.summary(mlir)
      report['inputs'] = len(exported.in_avals)
    except Exception as error:  # reported, and the test names it
      report = {'error': f'{type(error).__name__}: {error}'[:2000]}
    report['seconds'] = round(time.perf_counter() - start, 2)
    results[platform] = report
  return results


def churches(dtype: str):
  config = configs.reference_config()
  config.train.compute_dtype = dtype
  return config


def training_steps(report):
  mesh = parallel.make_mesh()
  # The R1 step is the plain step plus a second D update, so it holds every
  # program of the plain one: float32 without R1 and bfloat16 with it cover
  # both dtypes and both steps in two lowerings per platform, not four.
  for dtype, with_r1 in (('float32', False), ('bfloat16', True)):
    models, state, batch, shardings = train.abstract_step(
      churches(dtype), mesh, BATCH
    )
    step = train.jit_train_step(models, shardings)
    leaves = len(jax.tree_util.tree_leaves(state))
    name = f'train_step_{dtype}' + ('_r1' if with_r1 else '')
    # Jitted over this CPU's devices, the steps would otherwise make the
    # CPU's choices while tracing (`parallel.tracing_over`); one trace per
    # platform is also quicker than one with every choice staged.
    report[name] = lower(
      step,
      state,
      batch,
      per_platform_trace=True,
      static={'models': models, 'with_r1': with_r1},
    )
    report[name]['state_leaves'] = leaves


def generation(report):
  coords = grids.uniform(SIDE, SIDE)
  for dtype in (jnp.float32, jnp.bfloat16):
    config = churches(jnp.dtype(dtype).name)
    for form in ('activations', 'weights', 'fused'):
      config.train.per_image_form = form
      gen, _, _, _, state = train_state.abstract_state(config)
      variables = {'params': state.ema_params}
      z = jax.ShapeDtypeStruct((4, gen.style_dim), jnp.float32)

      def generate(variables, z, gen=gen):
        return sampling.generate(gen, variables, z, coords)

      name = f'generate_{form}_{jnp.dtype(dtype).name}'
      report[name] = lower(jax.jit(generate), variables, z)


def render_chunk(report):
  mesh = parallel.make_mesh()
  config = churches('bfloat16')
  gen, _, _, _, state = train_state.abstract_state(config)
  w = jax.ShapeDtypeStruct((1, gen.style_dim), jnp.float32)
  coords = jax.ShapeDtypeStruct((4096, 2), jnp.float32)
  chunk = shapes.parse(w, coords).chunk(4096)
  program = sampling.chunk_renderer(gen, None, mesh, chunk, False)
  report['render_chunk'] = lower(
    program, {'params': state.ema_params}, w, coords, None, None
  )


def inception_features(report):
  mesh = parallel.make_mesh()
  params = jax.eval_shape(
    lambda: inception.InceptionV3().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))
    )['params']
  )
  images = jax.ShapeDtypeStruct(
    (64, SIDE, SIDE, 3), jnp.uint8, sharding=parallel.batch_sharded(mesh)
  )
  params = abstract(params, parallel.replicated(mesh))
  report['inception_features'] = lower(
    inception.feature_program(mesh), params, images
  )


def fused_layers(report):
  """The Pallas layer at each churches width, as Triton and as Mosaic."""
  pixels = SIDE * SIDE
  widths = [(1024, 512), (512, 512), (512, 256), (256, 128), (128, 3)]
  for fan_in, fan_out in widths:
    for dtype in (jnp.float32, jnp.bfloat16):
      demodulate = fan_out != 3  # ToRGB has none
      args = [
        jax.ShapeDtypeStruct((4, pixels, fan_in), dtype),
        jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
        jax.ShapeDtypeStruct((4, fan_in), jnp.float32),
        jax.ShapeDtypeStruct((4, fan_out), jnp.float32) if demodulate else None,
        jax.ShapeDtypeStruct((fan_out,), jnp.float32),
      ]
      name = f'fused_{fan_in}_{fan_out}_{jnp.dtype(dtype).name}'
      report[name] = {}
      for platform, backend in (('cuda', 'gpu'), ('tpu', 'tpu')):
        layer = functools.partial(
          modulated_dense.fused_styled_dense,
          activation='lrelu' if demodulate else None,
          backend=backend,
        )
        present = [a for a in args if a is not None]

        def call(*values, layer=layer, demodulate=demodulate):
          x, kernel, scale, *rest = values
          inv_norm = rest[0] if demodulate else None
          return layer(x, kernel, scale, inv_norm, rest[-1])

        report[name].update(lower(jax.jit(call), *present, targets=[platform]))


def main():
  out = pathlib.Path(sys.argv[1])
  report = {'devices': jax.device_count()}
  start = time.perf_counter()
  for part in (
    training_steps,
    generation,
    render_chunk,
    inception_features,
    fused_layers,
  ):
    part(report)
  report['seconds'] = round(time.perf_counter() - start, 1)
  out.write_text(json.dumps(report, indent=1))
  print(json.dumps({'seconds': report['seconds']}))


if __name__ == '__main__':
  main()
