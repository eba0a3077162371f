"""The fused form jitted over 4 devices against the activations form on one.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/scripts/fused_over_devices.py

XLA cannot partition a Pallas call, so under `parallel.tracing_over` the fused
kernel splits itself over the 'data' axis (a shard_map, the batch padded to a
multiple of the devices). Six images on four devices: images and parameter
gradients must equal the activations form's, computed on one device. Prints a
JSON line: the largest relative differences, and how many shard_maps each
program's jaxpr holds.
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import generator as generator_lib
from cips_jax import grids
from cips_jax import models
from cips_jax import parallel

gen = models.CIPSskip(
  size=8, hidden_size=16, style_dim=16, n_mlp=1, max_channels=16
)
variables = models.init(gen, jax.random.PRNGKey(0))
z = jax.random.normal(jax.random.PRNGKey(1), (6, 16))
coords = grids.uniform(8, 8)


def images_and_grads(form, mesh):
  def loss(params):
    with parallel.tracing_over(mesh) if mesh else contextlib.nullcontext():
      rgb = gen.clone(per_image_form=form).apply(
        {'params': params}, z, coords, method=type(gen).generate
      )
    return jnp.sum(jnp.sin(rgb)), rgb

  program = jax.value_and_grad(loss, has_aux=True)
  if mesh is not None:
    program = jax.jit(program, in_shardings=parallel.replicated(mesh))
  else:
    program = jax.jit(program)
  shard_maps = str(jax.make_jaxpr(program)(variables['params'])).count(
    'shard_map'
  )
  (_, rgb), grads = program(variables['params'])
  return rgb, grads, shard_maps


mesh = parallel.make_mesh()
fused_rgb, fused_grads, fused_maps = images_and_grads(generator_lib.FUSED, mesh)
single_rgb, single_grads, single_maps = images_and_grads(
  generator_lib.MODULATED_ACTIVATIONS, None
)


def relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


print(
  json.dumps(
    {
      'devices': jax.device_count(),
      'images': relative(fused_rgb, single_rgb),
      'grads': max(
        relative(a, b)
        for a, b in zip(
          jax.tree_util.tree_leaves(fused_grads),
          jax.tree_util.tree_leaves(single_grads),
        )
      ),
      'fused_shard_maps': fused_maps,
      'activations_shard_maps': single_maps,
    }
  )
)
