"""Functional sampling: z -> w, truncation in W, rendering at any coordinates.

    w = sampling.mapping(gen, variables, z)  # (B, D) -> (B, D)
    # per-image or per-pixel w:
    img = sampling.synthesize(gen, variables, w, coords)
    # per-pixel mixtures:
    img = sampling.synthesize(gen, variables, ws, coords, mix=alpha)
    img = sampling.generate(
        gen, variables, z, coords, truncation_psi=0.6, w_avg=w_avg
    )
    # numpy, streamed:
    img = sampling.render(gen, variables, w, grids.uniform(4096, 4096))
    # lerp in W:
    ws = sampling.interpolation_styles(gen, variables, z0, z1, 60, space='w')
    # slerp in Z:
    ws = sampling.interpolation_styles(gen, variables, z0, z1, 60, space='z')

`mapping`, `synthesize` and `generate` are pure functions of (module, variables,
inputs), compiled once per model, option set and input shape (`jax.jit` with the
module static) and cached: the first call compiles, later calls of the same
shapes run the compiled program. They also work inside a caller's own `jax.jit`,
`grad` or `vmap`. Inputs follow the shape contract of `cips_jax.shapes`.
`rng=None` means zero noise, so renders are deterministic; with a key, each
pixel of each layer gets fresh N(0, 1) noise as in the reference.

Two ways to bound memory by streaming over pixel chunks:
- `render` (outside jit): a host loop calls one compiled function of a fixed
  chunk shape and writes each chunk into a numpy array, optionally with the
  chunk's pixels sharded over a mesh of devices and a progress callback. Its
  output is bit-identical to an unchunked `synthesize` (each pixel's arithmetic
  does not depend on its neighbours in the chunk), and only the output lives on
  the host: a 4096 x 4096 CIPSskip-256 render fits in a few GB
  (docs/benchmarks.md, "Rendering 4096×4096 in bounded memory").
- `synthesize(..., chunk_size=n)` (inside jit): a `fori_loop` over chunks. XLA
  compiles a loop body differently from straight-line code, so it agrees with
  the unchunked render to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec
import numpy as np

from cips_jax import errors
from cips_jax import generator as generator_lib
from cips_jax import parallel
from cips_jax import shapes

Array = jax.Array
Variables = Any

# Styles that vary per pixel (a w per pixel, or mixture weights) need a style, a
# squared style and a demodulation per pixel and layer on top of the
# activations: about twice the live memory of per-image styles. By default such
# renders stream over chunks of this many pixels per image, which keeps their
# peak memory near that of a per-image render of the same grid; pass chunk_size
# to choose otherwise.
PER_PIXEL_STYLE_CHUNK = 32768


def mapping(gen, variables: Variables, z: Array) -> Array:
  """The mapping network: z (..., D) -> w (..., D)."""
  return _mapping(gen, variables, jnp.asarray(z, jnp.float32))


# The module is static: flax modules are frozen, hashable dataclasses, so each
# model configuration compiles once and later calls hit the cache.
@functools.partial(jax.jit, static_argnames='gen')
def _mapping(gen, variables, z):
  return gen.apply(variables, z, method=lambda module, z: module.mapping(z))


def w_avg(
  gen,
  variables: Variables,
  rng: Array,
  num_samples: int = 10_000,
  batch_size: int = 1000,
) -> Array:
  """Estimates the mean of w over z ~ N(0, I), as (1, D).

  It is the centre of W-space truncation.
  """
  total = jnp.zeros((gen.style_dim,), jnp.float32)
  num_batches = math.ceil(num_samples / batch_size)
  for i in range(num_batches):
    # A short last batch keeps exactly num_samples latents (one more compile).
    count = min(batch_size, num_samples - i * batch_size)
    # fold_in per batch: the estimate is a function of (rng, num_samples,
    # batch_size) alone.
    z = jax.random.normal(jax.random.fold_in(rng, i), (count, gen.style_dim))
    total = total + mapping(gen, variables, z).sum(axis=0)
  return (total / num_samples)[None]


def truncate(w: Array, w_avg: Optional[Array], psi: float) -> Array:
  """W-space truncation w_avg + psi (w - w_avg).

  psi = 1 (or no w_avg) returns w.
  """
  if psi == 1.0:
    return w
  if w_avg is None:
    raise errors.InputError(
      'truncation_psi != 1 needs w_avg (see sampling.w_avg)'
    )
  return w_avg + psi * (w - w_avg)


def synthesize(
  gen,
  variables: Variables,
  w: Array,
  coords: Array,
  *,
  mix: Optional[Array] = None,
  rng: Optional[Array] = None,
  chunk_size: Optional[int] = None,
  embedding_mode: Optional[str] = None,
) -> Array:
  """Renders styles at coordinates.

  Args:
    gen: a CIPSskip / CIPSres module.
    variables: its variables `{'params': ...}`.
    w: (B, D) per image, (B, ..., D) per pixel, or (B, K, D) with `mix`.
    coords: (..., 2) shared by the batch (up to 3 dims, e.g. (H, W, 2)) or
      (B, ..., 2).
    mix: (B, ..., K) per-pixel weights of the K styles, summing to 1.
    rng: key for per-pixel noise; None means zero noise.
    chunk_size: render at most this many pixels (per image) at a time. None: all
      at once for per-image styles, chunks of PER_PIXEL_STYLE_CHUNK for
      per-pixel styles and mixtures.
    embedding_mode: 'bilinear' (default, the reference's evaluation path),
      'table', 'aligned'.
  Returns:
    (B, ..., 3) float32 RGB, unclamped.
  """
  w = jnp.asarray(w, jnp.float32)
  coords = jnp.asarray(coords, jnp.float32)
  mix = None if mix is None else jnp.asarray(mix, jnp.float32)
  # Parsed outside jit: the Layout is hashable and travels as a static argument,
  # so each input form gets its own program.
  layout = shapes.parse(w, coords, mix, gen.style_dim)
  return _synthesize(
    gen,
    variables,
    w,
    coords,
    mix,
    rng,
    layout=layout,
    chunk_size=_settled_chunk_size(layout, chunk_size),
    embedding_mode=embedding_mode,
  )


def _settled_chunk_size(
  layout: shapes.Layout, chunk_size: Optional[int]
) -> Optional[int]:
  """The chunk `_synthesize` streams over, or None for all pixels at once."""
  if chunk_size is None and layout.styles_vary_per_pixel:
    chunk_size = PER_PIXEL_STYLE_CHUNK
  # One chunk would cover every pixel: skip the loop, whose compiled body rounds
  # differently from the straight render (module docstring).
  if chunk_size is not None and chunk_size >= layout.num_pixels:
    return None
  return chunk_size


@functools.partial(
  jax.jit, static_argnames=('gen', 'layout', 'chunk_size', 'embedding_mode')
)
def _synthesize(
  gen, variables, w, coords, mix, rng, *, layout, chunk_size, embedding_mode
):
  """`synthesize` once its inputs are parsed and its options settled.

  Compiled per model, layout and options.
  """

  def render_layout(w, coords, mix, rng, layout):
    return _apply_generator(
      gen, variables, w, coords, mix, rng, embedding_mode, layout
    )

  if chunk_size is None:
    return render_layout(w, coords, mix, rng, layout)
  return _render_in_chunks(
    render_layout, layout, w, coords, mix, rng, chunk_size
  )


def _apply_generator(
  gen, variables, w, coords, mix, rng, embedding_mode, layout
):
  """The generator's render of parsed inputs (`layout`), in one program."""
  # Without a 'noise' stream the layers add zero noise (docs/reference.md
  # 6.3): renders are deterministic.
  rngs = None if rng is None else {'noise': rng}
  # 'auto' forms follow the platform this program is lowered for.
  return generator_lib.apply_per_platform(
    gen,
    variables,
    w,
    coords,
    mix=mix,
    embedding_mode=embedding_mode,
    layout=layout,
    rngs=rngs,
  )


def _render_in_chunks(
  render_layout, layout: shapes.Layout, w, coords, mix, rng, chunk_size: int
):
  """Renders `chunk_size` pixels at a time.

  A loop slices the inputs in place. Chunks start at multiples of chunk_size;
  the last one is moved back to end at the last pixel (overlapping its
  neighbour) so no input is padded or copied.
  """
  num_pixels = layout.num_pixels
  num_chunks = math.ceil(num_pixels / chunk_size)
  chunk_layout = layout.chunk(chunk_size)
  coords, w, mix = (
    layout.flat_coords(coords),
    layout.flat_w(w),
    layout.flat_mix(mix),
  )
  per_pixel_w = layout.styles == shapes.PER_PIXEL

  def take(x, start, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, chunk_size, axis=axis)

  def one_chunk(index, rgb):
    # `_settled_chunk_size` ensures chunk_size < num_pixels, so the clamped
    # start is never negative; the overlap is rendered twice and written twice.
    start = jnp.minimum(index * chunk_size, num_pixels - chunk_size)
    # Each chunk draws its own noise, so noisy renders depend on chunk_size.
    chunk_rng = None if rng is None else jax.random.fold_in(rng, index)
    chunk = render_layout(
      # Per-image styles and a mixture's (B, K, D) serve every chunk.
      take(w, start, 1) if per_pixel_w else w,
      take(coords, start, layout.pixel_axis),
      None if mix is None else take(mix, start, 1),
      chunk_rng,
      chunk_layout,
    )
    return jax.lax.dynamic_update_slice_in_dim(rgb, chunk, start, axis=1)

  # Only the output buffer is carried through the loop: one chunk's activations
  # are live at a time.
  rgb = jnp.zeros((layout.batch, num_pixels, 3), jnp.float32)
  rgb = jax.lax.fori_loop(0, num_chunks, one_chunk, rgb)
  return rgb.reshape(layout.output_shape())


# `render`'s default chunk: large enough to keep a CPU or GPU busy, small enough
# that a chunk of CIPSskip-256's widest layer (1024 channels) takes 256 MB.
RENDER_CHUNK = 65536
# Below a few dozen rows XLA computes matrix products with other kernels, which
# round differently; chunks of at least this many pixels (padded if need be)
# keep `render` bit-exact whatever the number of pixels.
MIN_RENDER_CHUNK = 256


def render(
  gen,
  variables: Variables,
  w: Array,
  coords: Array,
  *,
  mix: Optional[Array] = None,
  rng: Optional[Array] = None,
  chunk_size: int = RENDER_CHUNK,
  embedding_mode: Optional[str] = None,
  mesh: Optional[Mesh] = None,
  progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
  """Renders any number of pixels in bounded memory.

  A host loop runs over fixed-size chunks. Takes the arguments of `synthesize`
  (w per image (B, D), per pixel (B, ..., D), or (B, K, D) with `mix`
  (B, ..., K); coords (..., 2) shared or (B, ..., 2) per image) and returns the
  same image as a numpy array, bit-identical to an unchunked `synthesize` when
  rng is None. Every chunk has the same shape (the last is padded by repeating
  its final pixel), so one program is compiled and reused; inputs stay on the
  host and are sent one chunk at a time.

  Args:
    chunk_size: pixels per image per chunk (at least MIN_RENDER_CHUNK per
      device; rounded up to a multiple of the mesh size).
    mesh: a device mesh with the axis 'data' (`parallel.make_mesh()`): each
      chunk's pixels are split over its devices, each device rendering its share
      independently.
    progress: called as progress(pixels_done, pixels_total) after each chunk.
    rng: per-pixel noise key; chunk i (and device j) draws from fold_in keys of
      it, so noisy renders depend on the chunking.
  Returns:
    (B, ..., 3) float32 numpy array, unclamped.
  """
  if chunk_size < 1:
    raise errors.InputError(f'chunk_size must be positive, got {chunk_size}')
  w = np.asarray(w, np.float32)
  coords = np.asarray(coords, np.float32)
  mix = None if mix is None else np.asarray(mix, np.float32)
  layout = shapes.parse(w, coords, mix, gen.style_dim)
  num_pixels = layout.num_pixels
  per_pixel_w = layout.styles == shapes.PER_PIXEL
  coords, w, mix = (
    layout.flat_coords(coords),
    layout.flat_w(w),
    layout.flat_mix(mix),
  )
  num_devices = 1 if mesh is None else mesh.size
  # Small matrix products take other code paths in XLA, whose rounding differs:
  # even a handful of points is rendered as (padded) chunk of at least
  # MIN_RENDER_CHUNK pixels.
  chunk = max(min(chunk_size, num_pixels), MIN_RENDER_CHUNK * num_devices)
  if mesh is not None:
    chunk = parallel.divisible_by_devices(chunk, mesh)
  render_chunk = chunk_renderer(
    gen, embedding_mode, mesh, layout.chunk(chunk), rng is not None
  )
  # Sent once, not with every chunk: the parameters, and the styles every chunk
  # shares (per-pixel w stays on the host and travels chunk by chunk).
  placement = None if mesh is None else parallel.replicated(mesh)
  variables = jax.device_put(variables, placement)
  if not per_pixel_w:
    w = jax.device_put(w, placement)

  out = np.empty((layout.batch, num_pixels, 3), np.float32)
  for index, start in enumerate(range(0, num_pixels, chunk)):
    stop = min(start + chunk, num_pixels)
    # The last (or only) chunk repeats its final pixel up to the fixed chunk
    # shape (one compiled program); the copies are dropped below.
    rows = np.minimum(np.arange(start, start + chunk), num_pixels - 1)
    rgb = render_chunk(
      variables,
      w[:, rows] if per_pixel_w else w,
      np.take(coords, rows, axis=layout.pixel_axis),
      None if mix is None else mix[:, rows],
      None if rng is None else jax.random.fold_in(rng, index),
    )
    # np.asarray waits for the chunk, so at most one is in flight on the device.
    out[:, start:stop] = np.asarray(rgb)[:, : stop - start]
    if progress is not None:
      progress(stop, num_pixels)
  return out.reshape(layout.output_shape())


# Cached so that every render call with the same model and chunk reuses one
# jitted function: a fresh jax.jit wrapper would trace and compile again.
@functools.lru_cache(maxsize=32)
def chunk_renderer(gen, embedding_mode, mesh, chunk_layout, has_rng):
  """`render`'s jitted program for one chunk: cached per model and layout.

  (variables, w, coords, mix, rng) -> (B, n, 3) for the n pixels of
  `chunk_layout` (`Layout.chunk(n)`); sharded over `mesh` when given, each
  device rendering its share of the chunk's pixels.
  """
  num_devices = 1 if mesh is None else mesh.size
  # Inside shard_map each device sees its 1/n of the chunk's pixels (`render`
  # rounds the chunk to a multiple of the mesh size).
  device_layout = chunk_layout.chunk(chunk_layout.num_pixels // num_devices)

  def render_device_share(variables, w, coords, mix, rng):
    # The key is replicated: fold in the device index so that devices draw
    # different noise.
    if mesh is not None and rng is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
    return _apply_generator(
      gen, variables, w, coords, mix, rng, embedding_mode, device_layout
    )

  if mesh is None:
    return jax.jit(render_device_share)
  pixels = (
    PartitionSpec(parallel.DATA_AXIS)
    if chunk_layout.shared_coords
    else PartitionSpec(None, parallel.DATA_AXIS)
  )
  per_pixel = PartitionSpec(None, parallel.DATA_AXIS)
  # Parameters, per-image styles and the key are replicated; everything with a
  # pixel axis is split along it. None matches an absent mix or rng.
  in_specs = (
    PartitionSpec(),
    per_pixel if chunk_layout.styles == shapes.PER_PIXEL else PartitionSpec(),
    pixels,
    per_pixel if chunk_layout.styles == shapes.MIXTURE else None,
    PartitionSpec() if has_rng else None,
  )
  sharded = jax.shard_map(
    render_device_share,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=per_pixel,
    check_vma=False,
  )
  return jax.jit(sharded)


def lerp(a: Array, b: Array, t: Array) -> Array:
  """Linear interpolation: a, b (..., D), t (T,) -> (T, ..., D)."""
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * jnp.ndim(a))
  return (1.0 - t) * a + t * b


def slerp(a: Array, b: Array, t: Array, eps: float = 1e-7) -> Array:
  """Spherical interpolation between a and b.

  Along the great circle between the directions of a and b.

  For Gaussian latents z: the norm is interpolated linearly, the direction along
  the arc, so intermediate z keep a typical norm (a straight lerp passes near
  the origin). a, b (..., D), t (T,) -> (T, ..., D); parallel a, b fall back to
  lerp.
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * a.ndim)
  norm_a = jnp.linalg.norm(a, axis=-1, keepdims=True)
  norm_b = jnp.linalg.norm(b, axis=-1, keepdims=True)
  unit_a, unit_b = a / jnp.maximum(norm_a, eps), b / jnp.maximum(norm_b, eps)
  cos = jnp.clip(jnp.sum(unit_a * unit_b, axis=-1, keepdims=True), -1.0, 1.0)
  angle = jnp.arccos(cos)
  sin = jnp.sin(angle)
  small = sin < 1e-4
  # Keeps the branch `where` discards finite: a NaN there would still reach the
  # gradient.
  safe_sin = jnp.where(small, 1.0, sin)
  coef_a = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * angle) / safe_sin)
  coef_b = jnp.where(small, t, jnp.sin(t * angle) / safe_sin)
  direction = coef_a * unit_a + coef_b * unit_b
  return direction * ((1.0 - t) * norm_a + t * norm_b)


def interpolation_styles(
  gen,
  variables: Variables,
  z0: Array,
  z1: Array,
  num_frames: int,
  space: str = 'w',
  truncation_psi: float = 1.0,
  w_avg: Optional[Array] = None,
) -> Array:
  """Styles (num_frames, D) of a walk from z0 (D,) to z1 (D,).

  Both ends are included.

  space 'w': map both ends, truncate, and interpolate linearly in W (the space
  the layers see, where StyleGAN-style models are most linear). space 'z': slerp
  in Z, then map each frame (mapping is nonlinear, so the path in W is curved).
  """
  if num_frames < 2:
    raise errors.InputError(f'num_frames must be at least 2, got {num_frames}')
  t = jnp.linspace(0.0, 1.0, num_frames)
  if space == 'w':
    ends = truncate(
      mapping(gen, variables, jnp.stack([z0, z1])), w_avg, truncation_psi
    )
    return lerp(ends[0], ends[1], t)
  if space == 'z':
    return truncate(
      mapping(gen, variables, slerp(z0, z1, t)), w_avg, truncation_psi
    )
  raise errors.InputError(f"space must be 'w' or 'z', got {space!r}")


def generate(
  gen,
  variables: Variables,
  z: Array,
  coords: Array,
  *,
  truncation_psi: float = 1.0,
  w_avg: Optional[Array] = None,
  rng: Optional[Array] = None,
  chunk_size: Optional[int] = None,
  embedding_mode: Optional[str] = None,
) -> Array:
  """z (B, D) -> images (B, ..., 3): mapping, W-space truncation, synthesis.

  Truncation happens in W (towards `w_avg`), the correct form; the reference's
  forward truncates z when called without input_is_latent, which this does not
  reproduce.
  """
  shapes.check_latents(z, gen.style_dim)
  # The styles will be per image, (B, D): the layout is known from shapes alone.
  layout = shapes.parse((np.shape(z)[0], gen.style_dim), np.shape(coords))
  if truncation_psi != 1.0 and w_avg is None:
    raise errors.InputError(
      'truncation_psi != 1 needs w_avg (see sampling.w_avg)'
    )
  return _generate(
    gen,
    variables,
    jnp.asarray(z, jnp.float32),
    jnp.asarray(coords, jnp.float32),
    w_avg,
    rng,
    layout=layout,
    truncation_psi=truncation_psi,
    chunk_size=_settled_chunk_size(layout, chunk_size),
    embedding_mode=embedding_mode,
  )


# truncation_psi is static because `truncate` branches on it in Python. The
# jitted helpers called inside inline into this one program.
@functools.partial(
  jax.jit,
  static_argnames=(
    'gen',
    'layout',
    'truncation_psi',
    'chunk_size',
    'embedding_mode',
  ),
)
def _generate(
  gen,
  variables,
  z,
  coords,
  w_avg,
  rng,
  *,
  layout,
  truncation_psi,
  chunk_size,
  embedding_mode,
):
  w = truncate(_mapping(gen, variables, z), w_avg, truncation_psi)
  return _synthesize(
    gen,
    variables,
    w,
    coords,
    None,
    rng,
    layout=layout,
    chunk_size=chunk_size,
    embedding_mode=embedding_mode,
  )
