"""The fused Pallas layer as a function of ONE pixel, for the generator's vmaps.

    y = fused_pixel.styled_dense(
        x, kernel, scale, inv_norm, bias, noise=noise,
        noise_strength=noise_strength, activation='lrelu',
        out_dtype=jnp.bfloat16,
    )  # x (IN,) -> (OUT,)

The generator is written for one pixel and vmapped over pixels (inside) and
images (outside, `per_image_form='fused'`). This is that pixel's modulated
layer, and `jax.custom_batching.custom_vmap` turns the two vmaps into one
kernel call:
- unbatched, it is the reference formula for one pixel
  (`modulated_dense.styled_dense_reference`);
- vmapped over pixels (x and noise mapped, the image's style terms not), it
  is one image's layer (`_image_layer`, P pixels at once);
- that, vmapped over images, is one `modulated_dense.fused_styled_dense` call
  for all B images: Triton on GPUs, Mosaic on TPUs, Pallas's interpreter on
  CPUs, chosen for the platform the program is lowered for
  (`lax.platform_dependent`), not the one tracing it.
Any other batching (a style per pixel) falls back to the vmapped reference
formula, which is exact: the fused path serves per-image styles.

Under a jit over several devices XLA cannot partition the kernel call (a
Mosaic or Triton call is opaque to it; XLA:TPU refuses to compile it): traced
under `parallel.tracing_over(mesh)`, as the training step and the evaluation
renders are, the call runs in a shard_map over the 'data' axis, each device on
its own images.

Gradients: the kernel call has a custom VJP at the batched level (the VJP of
the (B, P) reference formula, so the kernel's gradient is one product over all
pixels, not a sum of per-pixel outer products). `custom_vmap` itself has no
reverse mode, so the layer differentiates where it is vmapped inside the
differentiated function (`grad` of a render, as training does); a bare pixel,
or per-example gradients (`vmap` of `grad`), are refused by JAX.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cips_jax import parallel
from cips_jax.kernels import modulated_dense

Array = jax.Array


def styled_dense(
  x: Array,
  kernel: Array,
  scale: Array,
  inv_norm: Optional[Array],
  bias: Array,
  *,
  noise: Optional[Array] = None,
  noise_strength: Optional[Array] = None,
  activation: Optional[str] = 'lrelu',
  out_dtype: Any = None,
) -> Array:
  """One pixel's style-modulated layer, fused into one kernel under vmap.

  The signature of `modulated_dense.fused_styled_dense` for one pixel.

  Args:
    x: (IN,) the pixel's activations.
    kernel: (IN, OUT) float32, scaled by 1/sqrt(IN).
    scale: (IN,) the image's input style scales.
    inv_norm: (OUT,) the image's demodulation, or None (ToRGB).
    bias: (OUT,).
    noise: () this pixel's noise, or None.
    noise_strength: () with `noise`.
    activation: 'lrelu' (leaky ReLU 0.2 times sqrt 2) or None.
    out_dtype: the result's dtype; default x.dtype.
  Returns:
    (OUT,) act(((x * scale) @ kernel) * inv_norm + noise_strength * noise +
    bias), in out_dtype.
  """
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  layer = _pixel_layer(
    activation, out_dtype, inv_norm is not None, noise is not None
  )
  args = [x, kernel, scale, bias]
  if inv_norm is not None:
    args.append(inv_norm)
  if noise is not None:
    args += [noise, noise_strength]
  return layer(*args)


class _Arguments:
  """Names the positional arrays of one layer configuration."""

  def __init__(self, demodulate: bool, with_noise: bool):
    self.names = ['x', 'kernel', 'scale', 'bias']
    if demodulate:
      self.names.append('inv_norm')
    if with_noise:
      self.names += ['noise', 'noise_strength']

  def named(self, args) -> dict[str, Any]:
    """{name: value}, with None for the terms this configuration lacks."""
    named = dict(zip(self.names, args))
    for name in ('inv_norm', 'noise', 'noise_strength'):
      named.setdefault(name, None)
    return named

  def batched(self, in_batched) -> set[str]:
    """The names of the mapped arguments."""
    return {name for name, b in zip(self.names, in_batched) if b}


@functools.lru_cache(maxsize=None)
def _pixel_layer(
  activation: Optional[str], out_dtype, demodulate: bool, with_noise: bool
) -> Callable[..., Array]:
  """The per-pixel layer of one static configuration (see the module doc)."""
  arguments = _Arguments(demodulate, with_noise)

  def reference(*args):
    # The (B, P)-shaped reference formula on a batch of one pixel, so that the
    # pixel, the fallback and the kernel share one definition.
    a = arguments.named(args)
    noise = a['noise']
    y = modulated_dense.styled_dense_reference(
      a['x'][None, None],
      a['kernel'],
      a['scale'][None],
      None if a['inv_norm'] is None else a['inv_norm'][None],
      a['bias'],
      noise=None if noise is None else jnp.reshape(noise, (1, 1)),
      noise_strength=a['noise_strength'],
      activation=activation,
      out_dtype=out_dtype,
    )
    return y[0, 0]

  image = _image_layer(arguments, activation, out_dtype, reference)

  def over_pixels(axis_size, in_batched, *args):
    mapped = arguments.batched(in_batched)
    # The per-image path: only the pixel's own inputs vary over the pixels.
    if 'x' in mapped and mapped <= {'x', 'noise'}:
      args = list(args)
      if with_noise and 'noise' not in mapped:
        i = arguments.names.index('noise')
        args[i] = jnp.broadcast_to(args[i], (axis_size,))
      return image(*args), True
    axes = [0 if b else None for b in in_batched]
    return jax.vmap(reference, in_axes=axes)(*args), True

  pixel = custom_vmap(reference)
  pixel.def_vmap(over_pixels)
  return pixel


def _image_layer(arguments, activation, out_dtype, reference):
  """One image's layer, x (P, IN); one kernel call for all images under vmap."""

  def kernel_call(named: dict[str, Any]) -> Array:
    """fused_styled_dense on (B, P, IN), built for the lowering platform."""
    arrays = {k: v for k, v in named.items() if v is not None}
    order = list(arrays)

    def build(backend):
      def call(*values):
        a = dict(zip(order, values))
        return modulated_dense.fused_styled_dense(
          a['x'],
          a['kernel'],
          a['scale'],
          a.get('inv_norm'),
          a['bias'],
          noise=a.get('noise'),
          noise_strength=a.get('noise_strength'),
          activation=activation,
          out_dtype=out_dtype,
          backend=backend,
        )

      return call

    by_platform = modulated_dense.KERNEL_BACKEND_BY_PLATFORM
    branches = {p: build(backend) for p, backend in by_platform.items()}

    def on_this_platform(*values):
      return jax.lax.platform_dependent(
        *values, default=build('interpret'), **branches
      )

    return _split_over_data(on_this_platform, arrays)

  def one_image(*args):
    a = arguments.named(args)
    # A batch of one image: (1, P, IN) with its (1, IN) and (1, OUT) terms.
    for name in ('x', 'scale', 'inv_norm', 'noise'):
      if a[name] is not None:
        a[name] = a[name][None]
    return kernel_call(a)[0]

  def over_images(axis_size, in_batched, *args):
    mapped = arguments.batched(in_batched)
    per_image = {'x', 'scale', 'inv_norm', 'noise'}
    if mapped <= per_image:
      a = arguments.named(args)
      # A term shared by the images (unmapped) is repeated per image: e.g. the
      # first layer's input features, when the images share coordinates.
      for name in per_image - mapped:
        if a[name] is not None:
          a[name] = jnp.broadcast_to(a[name], (axis_size, *a[name].shape))
      return kernel_call(a), True
    # Anything else (shared pixels, per-image kernels): exact, unfused.
    axes = [0 if b else None for b in in_batched]
    per_pixel = jax.vmap(reference, in_axes=_pixel_axes(arguments))
    return jax.vmap(per_pixel, in_axes=axes)(*args), True

  image = custom_vmap(one_image)
  image.def_vmap(over_images)
  return image


# The arguments with one row per image; the kernel and bias are shared.
_PER_IMAGE = ('x', 'scale', 'inv_norm', 'noise')


def _split_over_data(call: Callable[..., Array], arrays: dict[str, Array]):
  """`call(*arrays.values())`, one image shard per device of the mesh traced
  over (`parallel.tracing_over`).

  XLA cannot partition a Mosaic or Triton call: under a jit over several
  devices the kernel runs inside a shard_map over the 'data' axis, each device
  on its own images (the batch is padded to a multiple of the devices, the
  padding sliced off). Elsewhere it is called as is.
  """
  shards = parallel.splittable_data_shards()
  if shards == 1:
    return call(*arrays.values())
  batch = arrays['x'].shape[0]
  padding = -batch % shards
  padded = {
    name: jnp.pad(value, [(0, padding)] + [(0, 0)] * (value.ndim - 1))
    if name in _PER_IMAGE and padding
    else value
    for name, value in arrays.items()
  }
  split = PartitionSpec(parallel.DATA_AXIS)
  specs = tuple(
    split if name in _PER_IMAGE else PartitionSpec() for name in padded
  )
  sharded = jax.shard_map(
    call,
    mesh=jax.sharding.get_abstract_mesh(),
    in_specs=specs,
    out_specs=split,
    check_vma=False,
  )
  return sharded(*padded.values())[:batch]


def _pixel_axes(arguments) -> list[Optional[int]]:
  """The pixel vmap's in_axes within one image: only x and noise mapped."""
  return [0 if name in ('x', 'noise') else None for name in arguments.names]
