"""The CIPS generators (CIPSskip, CIPSres) and their mapping network.

A CIPS generator is a function of one pixel: `(xy, style) -> rgb`. The modules below write
that function (`synthesize_pixel`) and `__call__` lifts it with `nn.vmap`:
- per-image styles: every layer's style terms (`layers.Modulation`) are computed once per
  image, and one vmap runs over all (image, pixel) pairs, so each layer is one
  (B * P, in) x (in, out) product forwards and its weight gradient one 2-D product backwards;
- per-pixel styles and mixtures: a vmap over the pixels of an image, then over images. What
  does not depend on a mapped input is not batched: a mixture's K affines and K^2
  demodulations run once per image, and shared coordinates' features are read once.

Style forms accepted by `__call__` (w from the mapping network, D = style_dim):
- per image: `w` (B, D);
- per pixel: `w` (B, ..., D) with `...` the pixel shape of `coords`;
- a per-pixel mixture of K styles: `w` (B, K, D) and `mix` (B, ..., K), rows summing to 1.

Coordinates: `coords` (..., 2) with `[..., 0]` = x (along the width) and `[..., 1]` = y.
Up to 3 dimensions (`(2,)`, `(N, 2)`, `(H, W, 2)`) they are shared by the batch; with 4 or
more, `(B, ..., 2)`, each image has its own. Outputs are `(B, ..., 3)`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cips_jax import encodings
from cips_jax import layers

Array = jax.Array
DType = Any

ACTIVATIONS = (None, 'sin', 'sinrelu')
PIXEL_AXIS, IMAGE_AXIS = 'pixels', 'images'   # names of the two vmapped axes


class MappingNetwork(nn.Module):
  """z -> w: pixel norm, then `n_mlp` equalized dense layers (lr_mul 0.01, leaky ReLU x sqrt 2).

  Attributes:
    style_dim: width of z and w.
    n_mlp: number of dense layers.
    lr_mul: learning-rate multiplier of every layer.
  """
  style_dim: int = 512
  n_mlp: int = 8
  lr_mul: float = 0.01

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """z: (..., style_dim) -> w: (..., style_dim)."""
    x = layers.pixel_norm(z)
    for i in range(self.n_mlp):
      x = layers.EqualDense(self.style_dim, lr_mul=self.lr_mul, activate=True,
                            name=f'dense_{i}')(x)
    return x


def skip_widths(count: int, channel_multiplier: int, max_channels: int = 512) -> list[int]:
  """Widths of CIPSskip's layer pairs (the reference's channel table, capped)."""
  table = [512, 512, 512, 512, 256 * channel_multiplier, 128 * channel_multiplier,
           64 * channel_multiplier, 32 * channel_multiplier, 16 * channel_multiplier]
  return [min(w, max_channels) for w in _extend(table, count)]


def res_widths(count: int, channel_multiplier: int, max_channels: int = 512) -> list[int]:
  """Widths of CIPSres's residual blocks (entries 7 and 8 differ from CIPSskip)."""
  table = [512, 512, 512, 512, 256 * channel_multiplier, 128 * channel_multiplier,
           64 * channel_multiplier, 64 * channel_multiplier, 32 * channel_multiplier]
  return [min(w, max_channels) for w in _extend(table, count)]


def _extend(table: Sequence[int], count: int) -> list[int]:
  if count > len(table):
    raise ValueError(f'size too large: {count} layer pairs, the channel table has {len(table)}')
  return list(table[:count])


def num_pairs(size: int) -> int:
  """log2(size) - 1: the number of layer pairs (CIPSskip) or residual blocks (CIPSres)."""
  if size < 4 or size & (size - 1):
    raise ValueError(f'size must be a power of two >= 4, got {size}')
  return int(math.log2(size)) - 1


class _CIPS(nn.Module):
  """What CIPSskip and CIPSres share: mapping, Fourier features, embedding, the vmaps.

  Attributes:
    size: side of the coordinate-embedding table; also sets the depth (log2(size) - 1 pairs).
    hidden_size: width of the Fourier features and of the embedding (input is 2x this).
    style_dim: width of z and w.
    n_mlp: depth of the mapping network.
    lr_mlp: learning-rate multiplier of the mapping network.
    channel_multiplier: scales the narrow (late) layers, as in the reference.
    activation: None, 'sin' or 'sinrelu' (see layers.StyledDense).
    max_channels: caps every layer width (512 reproduces the reference; smaller for tests).
    embedding_mode: default coordinate-embedding lookup, one of encodings.EMBEDDING_MODES.
    cylindrical: x is an angle spanning 360 degrees over [-1, 1): the Fourier features see
      (cos pi x, sin pi x, y) and the embedding wraps along x, so panoramas close seamlessly.
    dtype: matrix-multiply input dtype (float32, or bfloat16 for speed); params stay float32.
    remat: recompute each modulated layer in the backward pass instead of storing its
      activations (per-layer rematerialisation, for 256x256 training in bounded memory).
  """
  size: int = 256
  hidden_size: int = 512
  style_dim: int = 512
  n_mlp: int = 8
  lr_mlp: float = 0.01
  channel_multiplier: int = 2
  activation: Optional[str] = None
  max_channels: int = 512
  embedding_mode: str = 'bilinear'
  cylindrical: bool = False
  dtype: DType = jnp.float32
  remat: bool = False

  @property
  def num_styled_layers(self) -> int:
    """How many modulated, noise-injected layers the pixel MLP has (one noise draw each)."""
    return 1 + 2 * num_pairs(self.size)

  def setup(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be None, 'sin' or 'sinrelu', got {self.activation!r}")
    self.mapping = MappingNetwork(self.style_dim, self.n_mlp, self.lr_mlp)
    self.fourier = encodings.FourierFeatures(self.hidden_size, self.cylindrical)
    self.embedding = self.param('embedding', nn.initializers.normal(1.0),
                                (self.size, self.size, self.hidden_size))
    self.conv1 = self._styled(2 * self.hidden_size, self._widths()[0])
    self.build_layers()

  def _styled(self, in_features: int, features: int) -> layers.StyledDense:
    return styled_dense_class(self.remat)(in_features, features, activation=self.activation,
                                          dtype=self.dtype)

  def _widths(self) -> list[int]:
    raise NotImplementedError

  def build_layers(self):
    raise NotImplementedError

  def pixel_mlp(self, features: Array, style: Optional[Array], mix: Optional[Array],
                noise: Optional[Array], pixel_axes: tuple[str, ...] = (),
                modulations: Optional[list] = None) -> Array:
    """(2 * hidden_size,) input features of one pixel -> (3,) RGB."""
    raise NotImplementedError

  def modulated_layers(self) -> list:
    """The layers that take a style, in the order `modulations_for` lists them."""
    raise NotImplementedError

  def modulations_for(self, w: Array) -> list:
    """w (..., D) -> every modulated layer's `layers.Modulation` for each style."""
    return [layer.modulation_for(w) for layer in self.modulated_layers()]

  def synthesize_pixel(self, xy: Array, style: Optional[Array], mix: Optional[Array] = None,
                       noise: Optional[Array] = None, embedding_mode: str = 'bilinear',
                       pixel_axes: tuple[str, ...] = (),
                       modulations: Optional[list] = None) -> Array:
    """One pixel: xy (2,), style (D,) or (K, D) with mix (K,), noise (L,) or None -> (3,).

    Instead of a style, `modulations` may give this pixel's precomputed style terms (the
    `modulations_for` of its image's w). `pixel_axes` (static): the vmapped axis names, given
    when the style or mix varies per pixel, so the layers can order their per-pixel style work
    (scheduling only).
    """
    embedding = encodings.lookup_embedding(self.embedding, xy, embedding_mode,
                                           wrap_x=self.cylindrical)
    features = jnp.concatenate([self.fourier(xy), embedding])
    return self.pixel_mlp(features, style, mix, noise, pixel_axes, modulations)

  def __call__(self, coords: Array, w: Array, mix: Optional[Array] = None,
               embedding_mode: Optional[str] = None) -> Array:
    """Renders RGB at `coords` for styles `w` (see the module docstring for the forms).

    Per-pixel noise is drawn from the 'noise' rng stream when the caller provides one
    (`rngs={'noise': key}`); without it the noise is zero and the output deterministic.

    Args:
      coords: (..., 2) shared by the batch (at most 3 dims) or (B, ..., 2).
      w: (B, D), (B, ..., D) or, with `mix`, (B, K, D).
      mix: optional (B, ..., K) mixture weights.
      embedding_mode: overrides `self.embedding_mode` ('bilinear', 'table', 'aligned').
    Returns:
      (B, ..., 3) float32 RGB, unclamped (trained against images in [-1, 1]).
    """
    mode = embedding_mode or self.embedding_mode
    if mode not in encodings.EMBEDDING_MODES:
      raise ValueError(f'embedding_mode must be one of {encodings.EMBEDDING_MODES}, got {mode!r}')
    coords = jnp.asarray(coords, jnp.float32)
    if coords.shape[-1] != 2:
      raise ValueError(f'coords must end in 2 (x, y), got shape {coords.shape}')
    batch = w.shape[0]
    shared = coords.ndim <= 3
    pixel_shape = coords.shape[:-1] if shared else coords.shape[1:-1]
    if not shared and coords.shape[0] != batch:
      raise ValueError(f'coords batch {coords.shape[0]} != styles batch {batch}')
    num_pixels = math.prod(pixel_shape)
    flat_coords = coords.reshape((num_pixels, 2) if shared else (batch, num_pixels, 2))

    style, style_pixel_axis, flat_mix = _flatten_styles(w, mix, pixel_shape, self.style_dim)
    noise = None
    if self.has_rng('noise'):
      noise = jax.random.normal(self.make_rng('noise'),
                                (batch, num_pixels, self.num_styled_layers))

    styles_vary_per_pixel = style_pixel_axis == 0 or mix is not None
    if not styles_vary_per_pixel:
      rgb = self._render_per_image_styles(flat_coords, style, noise, mode)
      return rgb.reshape((batch, *pixel_shape, 3))
    pixel_axes = (IMAGE_AXIS, PIXEL_AXIS)

    def one_pixel(module, xy, style, mix, noise):
      return module.synthesize_pixel(xy, style, mix, noise, mode, pixel_axes)

    over_pixels = nn.vmap(one_pixel, variable_axes={'params': None},
                          split_rngs={'params': False}, axis_name=PIXEL_AXIS,
                          in_axes=(0, style_pixel_axis, 0, 0))
    over_images = nn.vmap(over_pixels, variable_axes={'params': None},
                          split_rngs={'params': False}, axis_name=IMAGE_AXIS,
                          in_axes=(None if shared else 0, 0, 0, 0))
    rgb = over_images(self, flat_coords, style, flat_mix, noise)
    return rgb.reshape((batch, *pixel_shape, 3))

  def _render_per_image_styles(self, coords: Array, w: Array, noise: Optional[Array],
                               mode: str) -> Array:
    """coords (P, 2) or (B, P, 2), w (B, D), noise (B, P, L) or None -> (B * P, 3).

    Each layer's style terms are computed once per image, outside the pixel function, and
    every (image, pixel) pair is one entry of a single vmapped axis. Activations are then
    (B * P, C) matrices, so each weight gradient is one 2-D product: with separate image and
    pixel axes it contracts two axes, which XLA:CPU precedes with a transpose of the activations.
    """
    batch, num_pixels = w.shape[0], coords.shape[-2]
    def per_pixel(array):   # (B, ...) -> (B * P, ...), each image's value at each of its pixels
      return jnp.broadcast_to(array[:, None], (batch, num_pixels, *array.shape[1:])).reshape(
          batch * num_pixels, *array.shape[1:])
    modulations = jax.tree_util.tree_map(per_pixel, self.modulations_for(w))
    coords = jnp.broadcast_to(coords, (batch, num_pixels, 2)).reshape(-1, 2)
    if noise is not None:
      noise = noise.reshape(batch * num_pixels, -1)

    def one_pixel(module, xy, noise, modulations):
      return module.synthesize_pixel(xy, None, None, noise, mode, modulations=modulations)

    over_pixels = nn.vmap(one_pixel, variable_axes={'params': None},
                          split_rngs={'params': False}, axis_name=PIXEL_AXIS)
    return over_pixels(self, coords, noise, modulations)

  def generate(self, z: Array, coords: Array, embedding_mode: Optional[str] = None) -> Array:
    """Maps z (B, D) and renders at coords: the whole generator (used by init)."""
    return self(coords, self.mapping(z), embedding_mode=embedding_mode)


def _flatten_styles(w: Array, mix: Optional[Array], pixel_shape: tuple[int, ...],
                    style_dim: int):
  """Returns (styles, pixel axis of styles or None, mix flattened to (B, P, K) or None)."""
  num_pixels = math.prod(pixel_shape)
  if w.shape[-1] != style_dim:
    raise ValueError(f'styles must end in style_dim={style_dim}, got shape {w.shape}')
  if mix is not None:
    if w.ndim != 3:
      raise ValueError(f'with mix, w must be (B, K, D), got shape {w.shape}')
    expected = (w.shape[0], *pixel_shape, w.shape[1])
    if mix.shape != expected:
      raise ValueError(f'mix must have shape (B, ..., K) = {expected}, got {mix.shape}')
    return w, None, mix.reshape(w.shape[0], num_pixels, w.shape[1])
  if w.ndim == 2:
    return w, None, None
  if w.shape[1:-1] != pixel_shape:
    raise ValueError(f'per-pixel w must be (B, ..., D) with ... = {pixel_shape}, '
                     f'got shape {w.shape}')
  return w.reshape(w.shape[0], num_pixels, style_dim), 0, None



class CIPSskip(_CIPS):
  """The main CIPS model: 1 + 2 * (log2(size) - 1) modulated layers, toRGB every two layers.

  For size 256: 15 modulated layers (1024 -> 512, then pairs of widths 512 x5, 256, 128) and
  7 toRGB projections whose outputs are summed. 44,317,092 parameters at the defaults.
  """

  def _widths(self) -> list[int]:
    return skip_widths(num_pairs(self.size), self.channel_multiplier, self.max_channels)

  def build_layers(self):
    widths = self._widths()
    self.linears = [layer for fan_in, w in zip(_input_widths(widths), widths)
                    for layer in (self._styled(fan_in, w), self._styled(w, w))]
    self.to_rgbs = [layers.ToRGB(w, dtype=self.dtype) for w in widths]

  def modulated_layers(self):
    return [self.conv1, *self.linears, *self.to_rgbs]

  def pixel_mlp(self, features, style, mix, noise, pixel_axes=(), modulations=None):
    noise = _noise_list(noise, self.num_styled_layers)
    mods = _modulation_list(modulations, len(self.modulated_layers()))
    h = self.conv1(features, style, mix, noise[0], pixel_axes, mods[0])
    rgb = None
    for i, to_rgb in enumerate(self.to_rgbs):
      h = self.linears[2 * i](h, style, mix, noise[2 * i + 1], pixel_axes, mods[2 * i + 1])
      h = self.linears[2 * i + 1](h, style, mix, noise[2 * i + 2], pixel_axes, mods[2 * i + 2])
      rgb = to_rgb(h, style, mix, rgb, pixel_axes, mods[self.num_styled_layers + i])
    return rgb


def styled_dense_class(remat: bool):
  """StyledDense, or its rematerialised version (pixel_axes, argument 5 counting self, static)."""
  return _REMAT_STYLED_DENSE if remat else layers.StyledDense


_REMAT_STYLED_DENSE = nn.remat(layers.StyledDense, static_argnums=(5,))


class StyledResBlock(nn.Module):
  """(conv2(conv1(x)) + skip(x)) / sqrt(2); skip is a 1x1 equalized projection if widths differ."""
  in_features: int
  features: int
  activation: Optional[str] = None
  dtype: DType = jnp.float32
  remat: bool = False

  def setup(self):
    styled = styled_dense_class(self.remat)
    self.conv1 = styled(self.in_features, self.features, self.activation, self.dtype)
    self.conv2 = styled(self.features, self.features, self.activation, self.dtype)
    if self.in_features != self.features:
      self.skip = layers.EqualDense(self.features, use_bias=False)

  def modulation_for(self, style):
    """style (..., D) -> the Modulations of conv1 and conv2."""
    return self.conv1.modulation_for(style), self.conv2.modulation_for(style)

  def __call__(self, x, style, mix=None, noise=(None, None), pixel_axes=(), modulations=None):
    """x: (in,) -> (features,); noise: two per-pixel draws (or Nones)."""
    mods = (None, None) if modulations is None else modulations
    h = self.conv1(x, style, mix, noise[0], pixel_axes, mods[0])
    h = self.conv2(h, style, mix, noise[1], pixel_axes, mods[1])
    skip = x if self.in_features == self.features else self.skip(x)
    return (h + skip) / layers.SQRT2


class CIPSres(_CIPS):
  """The residual CIPS variant (the released Landscapes model): residual blocks, one toRGB.

  For size 256: a 1024 -> 512 modulated layer, 7 residual blocks (512 x5, 256, 128) and a final
  toRGB. 43,027,858 parameters at the defaults.
  """

  def _widths(self) -> list[int]:
    return res_widths(num_pairs(self.size), self.channel_multiplier, self.max_channels)

  def build_layers(self):
    widths = self._widths()
    self.blocks = [StyledResBlock(fan_in, w, self.activation, self.dtype, self.remat)
                   for fan_in, w in zip(_input_widths(widths), widths)]
    self.to_rgb = layers.ToRGB(widths[-1], dtype=self.dtype)

  def modulated_layers(self):
    return [self.conv1, *self.blocks, self.to_rgb]

  def pixel_mlp(self, features, style, mix, noise, pixel_axes=(), modulations=None):
    noise = _noise_list(noise, self.num_styled_layers)
    mods = _modulation_list(modulations, len(self.modulated_layers()))
    h = self.conv1(features, style, mix, noise[0], pixel_axes, mods[0])
    for i, block in enumerate(self.blocks):
      h = block(h, style, mix, (noise[2 * i + 1], noise[2 * i + 2]), pixel_axes, mods[i + 1])
    return self.to_rgb(h, style, mix, None, pixel_axes, mods[-1])


def _input_widths(widths: list[int]) -> list[int]:
  """Input width of each layer pair or block: conv1 outputs widths[0], then the previous one."""
  return [widths[0]] + widths[:-1]


def _noise_list(noise: Optional[Array], count: int) -> list:
  return [None] * count if noise is None else [noise[i] for i in range(count)]


def _modulation_list(modulations: Optional[list], count: int) -> list:
  return [None] * count if modulations is None else modulations
