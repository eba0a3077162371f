"""Functional sampling: z -> w, truncation in W, rendering at any coordinates.

    w = sampling.mapping(gen, variables, z)                             # (B, D) -> (B, D)
    img = sampling.synthesize(gen, variables, w, coords)                # per-image or per-pixel w
    img = sampling.synthesize(gen, variables, ws, coords, mix=alpha)    # per-pixel mixtures
    img = sampling.generate(gen, variables, z, coords, truncation_psi=0.6, w_avg=w_avg)

Everything is a pure function of (module, variables, inputs); call it under `jax.jit` or not.
`rng=None` means zero noise, so renders are deterministic; with a key, each pixel of each layer
gets fresh N(0, 1) noise as in the reference. `chunk_size` streams over pixel chunks in a
loop, so memory is bounded by the chunk whatever the output size.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
Variables = Any

# Styles that vary per pixel (a w per pixel, or mixture weights) need a style, a squared
# style and a demodulation per pixel and layer on top of the activations: about twice the
# live memory of per-image styles. By default such renders stream over chunks of this many
# pixels per image, which keeps their peak memory near that of a per-image render of the
# same grid; pass chunk_size to choose otherwise.
PER_PIXEL_STYLE_CHUNK = 32768


def mapping(gen, variables: Variables, z: Array) -> Array:
  """The mapping network: z (..., D) -> w (..., D)."""
  return gen.apply(variables, jnp.asarray(z, jnp.float32), method=lambda m, z: m.mapping(z))


def w_avg(gen, variables: Variables, rng: Array, num_samples: int = 10_000,
          batch_size: int = 1000) -> Array:
  """Estimates the mean of w over z ~ N(0, I): (1, D), the centre of W-space truncation."""
  total = jnp.zeros((gen.style_dim,), jnp.float32)
  num_batches = math.ceil(num_samples / batch_size)
  for i in range(num_batches):
    count = min(batch_size, num_samples - i * batch_size)
    z = jax.random.normal(jax.random.fold_in(rng, i), (count, gen.style_dim))
    total = total + mapping(gen, variables, z).sum(axis=0)
  return (total / num_samples)[None]


def truncate(w: Array, w_avg: Optional[Array], psi: float) -> Array:
  """W-space truncation w_avg + psi (w - w_avg); psi = 1 (or no w_avg) returns w."""
  if psi == 1.0:
    return w
  if w_avg is None:
    raise ValueError('truncation_psi != 1 needs w_avg (see sampling.w_avg)')
  return w_avg + psi * (w - w_avg)


def synthesize(gen, variables: Variables, w: Array, coords: Array, mix: Optional[Array] = None,
               rng: Optional[Array] = None, chunk_size: Optional[int] = None,
               embedding_mode: Optional[str] = None) -> Array:
  """Renders styles at coordinates.

  Args:
    gen: a CIPSskip / CIPSres module.
    variables: its variables `{'params': ...}`.
    w: (B, D) per image, (B, ..., D) per pixel, or (B, K, D) with `mix`.
    coords: (..., 2) shared by the batch (up to 3 dims, e.g. (H, W, 2)) or (B, ..., 2).
    mix: (B, ..., K) per-pixel weights of the K styles, summing to 1.
    rng: key for per-pixel noise; None means zero noise.
    chunk_size: render at most this many pixels (per image) at a time. None: all at once for
      per-image styles, chunks of PER_PIXEL_STYLE_CHUNK for per-pixel styles and mixtures.
    embedding_mode: 'bilinear' (default, the reference's evaluation path), 'table', 'aligned'.
  Returns:
    (B, ..., 3) float32 RGB, unclamped.
  """
  w = jnp.asarray(w, jnp.float32)
  coords = jnp.asarray(coords, jnp.float32)

  def render(coords, w, mix, rng):
    rngs = None if rng is None else {'noise': rng}
    return gen.apply(variables, coords, w, mix=mix, embedding_mode=embedding_mode, rngs=rngs)

  shared = coords.ndim <= 3
  pixel_shape = coords.shape[:-1] if shared else coords.shape[1:-1]
  num_pixels = math.prod(pixel_shape)
  if chunk_size is None and (mix is not None or w.ndim > 2):
    chunk_size = PER_PIXEL_STYLE_CHUNK
  if chunk_size is None or chunk_size >= num_pixels:
    return render(coords, w, mix, rng)
  return _render_in_chunks(render, coords, w, mix, rng, shared, pixel_shape, chunk_size)


def _render_in_chunks(render, coords, w, mix, rng, shared, pixel_shape, chunk_size):
  """Renders `chunk_size` pixels at a time with a loop that slices the inputs in place.

  Chunks start at multiples of chunk_size; the last one is moved back to end at the last
  pixel (overlapping its neighbour) so no input is padded or copied.
  """
  batch = w.shape[0]
  num_pixels = math.prod(pixel_shape)
  num_chunks = math.ceil(num_pixels / chunk_size)
  flat_coords = coords.reshape((num_pixels, 2) if shared else (batch, num_pixels, 2))
  per_pixel_w = mix is None and w.ndim > 2
  if per_pixel_w:
    w = w.reshape(batch, num_pixels, w.shape[-1])
  if mix is not None:
    mix = mix.reshape(batch, num_pixels, mix.shape[-1])

  def take(x, start, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, chunk_size, axis=axis)

  def one_chunk(index, rgb):
    start = jnp.minimum(index * chunk_size, num_pixels - chunk_size)
    chunk_rng = None if rng is None else jax.random.fold_in(rng, index)
    chunk = render(take(flat_coords, start, 0 if shared else 1),
                   take(w, start, 1) if per_pixel_w else w,
                   None if mix is None else take(mix, start, 1), chunk_rng)
    return jax.lax.dynamic_update_slice_in_dim(rgb, chunk, start, axis=1)

  rgb = jnp.zeros((batch, num_pixels, 3), jnp.float32)
  rgb = jax.lax.fori_loop(0, num_chunks, one_chunk, rgb)
  return rgb.reshape(batch, *pixel_shape, 3)


def generate(gen, variables: Variables, z: Array, coords: Array, truncation_psi: float = 1.0,
             w_avg: Optional[Array] = None, rng: Optional[Array] = None,
             chunk_size: Optional[int] = None, embedding_mode: Optional[str] = None) -> Array:
  """z (B, D) -> images (B, ..., 3): mapping, W-space truncation, synthesis.

  Truncation happens in W (towards `w_avg`), the correct form; the reference's forward
  truncates z when called without input_is_latent, which this does not reproduce.
  """
  w = truncate(mapping(gen, variables, z), w_avg, truncation_psi)
  return synthesize(gen, variables, w, coords, rng=rng, chunk_size=chunk_size,
                    embedding_mode=embedding_mode)
