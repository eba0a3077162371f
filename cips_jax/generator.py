"""The CIPS generators (CIPSskip, CIPSres).

A CIPS generator is a function of one pixel: `(xy, style) -> rgb`. The modules
below write that function (`synthesize_pixel`) and `__call__` lifts it with
`nn.vmap`:
- per-image styles: every layer's style terms (`layers.Modulation`) are computed
  once per image, and one vmap runs over all (image, pixel) pairs, so each layer
  is one (B * P, in) x (in, out) product forwards and its weight gradient one
  2-D product backwards;
- per-pixel styles and mixtures: a vmap over the pixels of an image, then over
  images. What does not depend on a mapped input is not batched: a mixture's K
  affines and K^2 demodulations run once per image, and shared coordinates'
  features are read once.

`__call__(w, coords, mix=None)` takes styles and coordinates in the forms of
`cips_jax.shapes` (per-image, per-pixel or mixed styles; shared or per-image
coordinates) and returns `(B, ..., 3)`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cips_jax import encodings
from cips_jax import errors
from cips_jax import layers
from cips_jax import platforms
from cips_jax import shapes
from cips_jax import widths as widths_lib

Array = jax.Array
DType = Any

ACTIVATIONS = (None, 'sin', 'sinrelu')
PIXEL_AXIS, IMAGE_AXIS = 'pixels', 'images'  # names of the two vmapped axes

# How a per-image style reaches the pixels: scaling the activations before and
# after each product ('activations'), folded into one weight per image
# ('weights', the reference's form), or inside one Pallas kernel per layer
# ('fused', `kernels.fused_pixel`; opt-in until a device measures it).
# Per-pixel styles and mixtures always modulate activations.
MODULATED_ACTIVATIONS, FOLDED_WEIGHTS, FUSED = 'activations', 'weights', 'fused'
PER_IMAGE_FORMS = (MODULATED_ACTIVATIONS, FOLDED_WEIGHTS, FUSED, 'auto')
# 'auto' per backend, by measurement (docs/benchmarks.md, "Per-image style
# forms"): on CPUs folding only wins from a few images per call, and batch-1
# renders are the common library call, so CPUs keep activations. TPUs fold, by
# XLA:TPU's own analysis of the compiled programs (docs/tpu_compile.md): the
# churches step in bfloat16 on a v5e chip needs 8.4 GiB and moves 161 GB with
# folded weights, against 14.9 GiB (rematerialized to fit, 14% more FLOPs) and
# 328 GB with modulated activations; generation 4.0 against 7.5 GiB, 51
# against 142 GB, on every generation. GPUs: not measured yet.
PER_IMAGE_FORM_BY_BACKEND = {
  'cpu': MODULATED_ACTIVATIONS,
  'tpu': FOLDED_WEIGHTS,
}


def _vmap_over(fn, axis_name: str, in_axes=0):
  """`nn.vmap` of `fn(module, ...)` sharing the parameters across the axis."""
  return nn.vmap(
    fn,
    # None: broadcast, not mapped; every pixel reads the same parameters.
    variable_axes={'params': None},
    # One init for all pixels; the noise is drawn before the vmap (`__call__`),
    # so no rng stream is split per pixel.
    split_rngs={'params': False},
    axis_name=axis_name,
    in_axes=in_axes,
  )


def _pixel_with_modulations(mode: str):
  """`fn(module, xy, noise, modulations)`: one pixel, its style precomputed."""

  def one_pixel(module, xy, noise, modulations):
    return module.synthesize_pixel(
      xy, noise=noise, embedding_mode=mode, modulations=modulations
    )

  return one_pixel


def resolve_per_image_form(form: str, backend: Optional[str] = None) -> str:
  """`form`, or for 'auto' the choice of `backend` (default: jax's default).

  Programs that may be lowered for another platform resolve 'auto' with
  `apply_per_platform` instead.
  """
  if form not in PER_IMAGE_FORMS:
    raise errors.InputError(
      f'per_image_form must be one of {PER_IMAGE_FORMS}, got {form!r}'
    )
  if form != 'auto':
    return form
  return platforms.resolve(
    PER_IMAGE_FORM_BY_BACKEND, MODULATED_ACTIVATIONS, backend
  )


def apply_per_platform(gen: CIPS, variables, *args, **kwargs) -> Any:
  """gen.apply(variables, *args, **kwargs), with per_image_form 'auto'
  resolved for the platform the program is lowered for.

  `sampling` and `train` call the generator through this, so a program
  exported from a CPU for a GPU carries the GPU's form (`platforms.dispatch`).
  """
  if gen.per_image_form != 'auto':
    return gen.apply(variables, *args, **kwargs)
  return platforms.dispatch(
    PER_IMAGE_FORM_BY_BACKEND,
    MODULATED_ACTIVATIONS,
    lambda form: gen.clone(per_image_form=form).apply(
      variables, *args, **kwargs
    ),
  )


class CIPS(nn.Module):
  """What CIPSskip and CIPSres share.

  The mapping network, Fourier features, embedding and the vmaps.

  Attributes:
    size: side of the coordinate-embedding table; also sets the depth
      (log2(size) - 1 pairs).
    hidden_size: width of the Fourier features and of the embedding (input is 2x
      this).
    style_dim: width of z and w.
    n_mlp: depth of the mapping network.
    lr_mlp: learning-rate multiplier of the mapping network.
    channel_multiplier: scales the narrow (late) layers, as in the reference.
    activation: None, 'sin' or 'sinrelu' (see layers.StyledDense).
    max_channels: caps every layer width (512 reproduces the reference; smaller
      for tests).
    embedding_mode: default coordinate-embedding lookup, one of
      encodings.EMBEDDING_MODES.
    cylindrical: x is an angle spanning 360 degrees over [-1, 1): the Fourier
      features see (cos pi x, sin pi x, y) and the embedding wraps along x, so
      panoramas close seamlessly.
    dtype: matrix-multiply input dtype (float32, or bfloat16 for speed); params
      stay float32.
    remat: recompute each modulated layer in the backward pass instead of
      storing its activations (per-layer rematerialisation, for 256x256
      training in bounded memory).
  """

  size: int = 256
  hidden_size: int = 512
  style_dim: int = 512
  n_mlp: int = 8
  lr_mlp: float = 0.01
  channel_multiplier: int = 2
  activation: Optional[str] = None
  max_channels: int = 512
  # The reference's evaluation read, so converted checkpoints render as the
  # official code does (docs/reference.md 6.1).
  embedding_mode: str = 'bilinear'
  cylindrical: bool = False
  dtype: DType = jnp.float32
  remat: bool = False
  per_image_form: str = 'auto'
  # The subclass's channel table (`widths`), by layer pair or block.
  width_table: ClassVar[Callable[..., list[int]]]

  @property
  def num_styled_layers(self) -> int:
    """How many modulated, noise-injected layers the pixel MLP has.

    Each takes one noise draw.
    """
    # conv1, then two per stage (CIPSres: two per block); ToRGBs take no noise.
    return 1 + 2 * widths_lib.num_pairs(self.size)

  def layer_widths(self) -> list[int]:
    """Output width of each layer pair (CIPSskip) or residual block."""
    return self.width_table(
      widths_lib.num_pairs(self.size),
      self.channel_multiplier,
      self.max_channels,
    )

  def setup(self):
    if self.activation not in ACTIVATIONS:
      raise errors.InputError(
        f"activation must be None, 'sin' or 'sinrelu', got {self.activation!r}"
      )
    self.mapping = layers.MappingNetwork(
      self.style_dim, self.n_mlp, self.lr_mlp
    )
    self.fourier = encodings.FourierFeatures(self.hidden_size, self.cylindrical)
    # N(0, 1), stored (size, size, C) and indexed [row=y, col=x]: the
    # reference's (1, C, size, size) `emb.input`, moved (docs/reference.md 1.1).
    self.embedding = self.param(
      'embedding',
      nn.initializers.normal(1.0),
      (self.size, self.size, self.hidden_size),
    )
    # Its input is the Fourier features and the embedding side by side.
    self.conv1 = self.styled_dense(2 * self.hidden_size, self.layer_widths()[0])
    self.build_layers()

  def styled_dense(self, in_features: int, features: int) -> layers.StyledDense:
    """A StyledDense with this generator's activation, dtype and remat."""
    return layers.StyledDense(
      in_features,
      features,
      activation=self.activation,
      dtype=self.dtype,
      remat=self.remat,
      fused=self.fused,
    )

  @property
  def fused(self) -> bool:
    """Whether per-image styles run through the fused Pallas layer."""
    return self.per_image_form == FUSED

  def build_layers(self):
    """Creates the layers after `conv1` (called by `setup`)."""
    raise NotImplementedError

  def pixel_mlp(
    self,
    features: Array,
    *,
    styled: layers.PixelStyle = layers.PixelStyle(),
    noise: Optional[Array] = None,
    modulations: Optional[list] = None,
  ) -> Array:
    """(2 * hidden_size,) input features of one pixel -> (3,) RGB.

    noise: (num_styled_layers,) draws or None; modulations: the
    `modulations_for` of this pixel's style, or None (then `styled`).
    """
    noises = (
      [None] * self.num_styled_layers
      if noise is None
      else [noise[i] for i in range(self.num_styled_layers)]
    )
    mods = modulations or [None] * len(self.modulated_layers())
    h = self.conv1(features, noise=noises[0], modulation=mods[0], styled=styled)
    return self.layers_after_conv1(h, noises[1:], mods[1:], styled)

  def layers_after_conv1(
    self, h: Array, noises: list, modulations: list, styled: layers.PixelStyle
  ) -> Array:
    """conv1's output (width,) -> (3,) RGB, through the rest of the MLP.

    noises: one draw (or None) per styled layer after conv1; modulations:
    those of `modulated_layers()` after conv1; styled: the pixel's style.
    """
    raise NotImplementedError

  def modulated_layers(self) -> list:
    """The layers that take a style, in `modulations_for`'s order."""
    raise NotImplementedError

  def modulations_for(self, w: Array, *, fold_weights: bool = False) -> list:
    """w (..., D) -> each modulated layer's `layers.Modulation` per style.

    `fold_weights`: the per-image weight form (`ModulatedDense.folded`).
    """
    return [
      layer.modulation_for(w, fold_weights=fold_weights)
      for layer in self.modulated_layers()
    ]

  def synthesize_pixel(
    self,
    xy: Array,
    *,
    styled: layers.PixelStyle = layers.PixelStyle(),
    noise: Optional[Array] = None,
    embedding_mode: str = 'bilinear',
    modulations: Optional[list] = None,
  ) -> Array:
    """The RGB (3,) of one pixel from its xy (2,), style and noise.

    `styled`: the pixel's `layers.PixelStyle`; noise is (L,) or None. Instead
    of a style, `modulations` may give this pixel's precomputed style terms
    (the `modulations_for` of its image's w).
    """
    embedding = encodings.lookup_embedding(
      self.embedding, xy, embedding_mode, wrap_x=self.cylindrical
    )
    # Fourier features first: the reference's torch.cat([x, emb]) order, which
    # the rows of converted conv1 weights follow.
    features = jnp.concatenate([self.fourier(xy), embedding])
    return self.pixel_mlp(
      features, styled=styled, noise=noise, modulations=modulations
    )

  def __call__(
    self,
    w: Array,
    coords: Array,
    *,
    mix: Optional[Array] = None,
    embedding_mode: Optional[str] = None,
    layout: Optional[shapes.Layout] = None,
  ) -> Array:
    """Renders RGB at `coords` for styles `w`, as `cips_jax.shapes` describes.

    Per-pixel noise is drawn from the 'noise' rng stream when the caller
    provides one (`rngs={'noise': key}`); without it the noise is zero and the
    output deterministic.

    Args:
      w: (B, D) per image, (B, ..., D) per pixel or, with `mix`, (B, K, D).
      coords: (..., 2) shared by the batch (at most 3 dims) or (B, ..., 2) per
        image.
      mix: optional (B, ..., K) mixture weights.
      embedding_mode: overrides `self.embedding_mode` ('bilinear', 'table',
        'aligned').
      layout: the inputs' `shapes.Layout` when the caller has parsed them
        already (`cips_jax.sampling` does, once per call); else they are
        parsed here.
    Returns:
      (B, ..., 3) float32 RGB, unclamped (trained against images in [-1, 1]).
    """
    mode = embedding_mode or self.embedding_mode
    if mode not in encodings.EMBEDDING_MODES:
      raise errors.InputError(
        f'embedding_mode must be one of {encodings.EMBEDDING_MODES}, '
        f'got {mode!r}'
      )
    if layout is None:
      layout = shapes.parse(w, coords, mix, self.style_dim)
    coords = layout.flat_coords(jnp.asarray(coords, jnp.float32))
    w, mix = layout.flat_w(w), layout.flat_mix(mix)
    # One N(0, 1) scalar per (image, pixel, styled layer), shared by the
    # channels; drawn only when asked for (docs/reference.md 1.3, 6.3).
    noise = None
    if self.has_rng('noise'):
      noise = jax.random.normal(
        self.make_rng('noise'),
        (layout.batch, layout.num_pixels, self.num_styled_layers),
      )
    # Per-pixel styles cannot be folded into one weight per image.
    if layout.styles_vary_per_pixel:
      rgb = self._render_per_pixel_styles(layout, coords, w, mix, noise, mode)
    elif resolve_per_image_form(self.per_image_form) == FOLDED_WEIGHTS:
      rgb = self._render_per_image_nested(
        layout, coords, w, noise, mode, fold_weights=True
      )
    elif self.fused:
      rgb = self._render_per_image_nested(
        layout, coords, w, noise, mode, fold_weights=False
      )
    else:
      rgb = self._render_per_image_styles(layout, coords, w, noise, mode)
    return rgb.reshape(layout.output_shape())

  def _render_per_pixel_styles(
    self,
    layout: shapes.Layout,
    coords: Array,
    w: Array,
    mix: Optional[Array],
    noise: Optional[Array],
    mode: str,
  ) -> Array:
    """A vmap over the pixels of an image, then one over the images: (B, P, 3).

    coords (P, 2) or (B, P, 2); w (B, P, D), or (B, K, D) with mix (B, P, K).
    """
    # Both axes: the ordering anchor sums over every vmapped axis, so it is
    # unbatched (see `layers.ordering_anchor`).
    pixel_axes = (IMAGE_AXIS, PIXEL_AXIS)

    def one_pixel(module, xy, style, mix, noise):
      return module.synthesize_pixel(
        xy,
        styled=layers.PixelStyle(style, mix, pixel_axes),
        noise=noise,
        embedding_mode=mode,
      )

    # A mixture's K styles are per image: unmapped over the pixels, so their
    # affines and Gram run once per image.
    style_axis = 0 if layout.styles == shapes.PER_PIXEL else None
    over_pixels = _vmap_over(one_pixel, PIXEL_AXIS, (0, style_axis, 0, 0))
    # Shared coords stay unmapped over the images: their features (Fourier,
    # embedding) are computed once, not once per image.
    over_images = _vmap_over(
      over_pixels, IMAGE_AXIS, (None if layout.shared_coords else 0, 0, 0, 0)
    )
    return over_images(self, coords, w, mix, noise)

  def _render_per_image_styles(
    self,
    layout: shapes.Layout,
    coords: Array,
    w: Array,
    noise: Optional[Array],
    mode: str,
  ) -> Array:
    """The RGB (B * P, 3) of per-image styles w (B, D) at coords.

    coords are (P, 2) or (B, P, 2); noise is (B, P, L) or None. Each layer's
    style terms are computed once per image, outside the pixel function, and
    every (image, pixel) pair is one entry of a single vmapped axis. Activations
    are then (B * P, C) matrices, so each weight gradient is one 2-D product:
    with separate image and pixel axes it contracts two axes, which XLA:CPU
    precedes with a transpose of the activations.
    """
    batch, num_pixels = layout.batch, layout.num_pixels

    # (B, ...) -> (B * P, ...): each image's value at its pixels.
    def per_pixel(array):
      return jnp.broadcast_to(
        array[:, None], (batch, num_pixels, *array.shape[1:])
      ).reshape(batch * num_pixels, *array.shape[1:])

    modulations = jax.tree_util.tree_map(per_pixel, self.modulations_for(w))
    # The single flat axis maps every input, so shared coords are repeated per
    # image (their features are then computed per image too).
    coords = jnp.broadcast_to(coords, (batch, num_pixels, 2)).reshape(-1, 2)
    if noise is not None:
      noise = noise.reshape(batch * num_pixels, -1)

    over_pixels = _vmap_over(_pixel_with_modulations(mode), PIXEL_AXIS)
    return over_pixels(self, coords, noise, modulations)

  def _render_per_image_nested(
    self,
    layout: shapes.Layout,
    coords: Array,
    w: Array,
    noise: Optional[Array],
    mode: str,
    *,
    fold_weights: bool,
  ) -> Array:
    """The RGB (B * P, 3) of per-image styles w (B, D): pixels inside images.

    coords are (P, 2) or (B, P, 2); noise is (B, P, L) or None. Each layer's
    style terms are computed once per image and mapped over the images only:
    with `fold_weights`, one (in, out) weight per image (the reference's form),
    so each layer is one batched product; otherwise (the fused form) the
    scales and demodulations, which `kernels.fused_pixel` turns into one
    kernel call per layer for all images.
    """
    modulations = self.modulations_for(w, fold_weights=fold_weights)

    # The style terms are per image: unmapped over its pixels, so each layer
    # sees (P, in) activations and one image's terms.
    over_pixels = _vmap_over(
      _pixel_with_modulations(mode), PIXEL_AXIS, (0, 0, None)
    )
    over_images = _vmap_over(
      over_pixels, IMAGE_AXIS, (None if layout.shared_coords else 0, 0, 0)
    )
    rgb = over_images(self, coords, noise, modulations)
    # (B, P, 3) -> the flat (B * P, 3) that the other per-image path returns.
    return rgb.reshape(layout.batch * layout.num_pixels, 3)

  def generate(
    self, z: Array, coords: Array, *, embedding_mode: Optional[str] = None
  ) -> Array:
    """Maps z (B, D) and renders at coords: the whole generator.

    `init` uses it.
    """
    return self(self.mapping(z), coords, embedding_mode=embedding_mode)


class CIPSskip(CIPS):
  """The main CIPS model: toRGB every two modulated layers.

  It has 1 + 2 * (log2(size) - 1) modulated layers. For size 256: 15 modulated
  layers (1024 -> 512, then pairs of widths 512 x5, 256, 128) and 7 toRGB
  projections whose outputs are summed. 44,317,092 parameters at the defaults.
  """

  width_table = staticmethod(widths_lib.skip_widths)

  def build_layers(self):
    widths = self.layer_widths()
    # The reference's flat `linears.{0..2n-1}`: two per stage, the first of
    # each pair changing the width.
    self.linears = [
      layer
      for fan_in, width in zip(widths_lib.input_widths(widths), widths)
      for layer in (
        self.styled_dense(fan_in, width),
        self.styled_dense(width, width),
      )
    ]
    self.to_rgbs = [
      layers.ToRGB(width, dtype=self.dtype, fused=self.fused)
      for width in widths
    ]

  def modulated_layers(self):
    return [self.conv1, *self.linears, *self.to_rgbs]

  def layers_after_conv1(self, h, noises, modulations, styled):
    # modulated_layers() lists the 2n linears, then the n ToRGBs.
    linear_mods, rgb_mods = _split(modulations, len(self.linears))
    stages = zip(
      _pairs(self.linears), _pairs(noises), _pairs(linear_mods), self.to_rgbs
    )
    # The running sum of every ToRGB (the reference starts it at 0); no tanh
    # or clamp at the end (docs/reference.md 1.4).
    rgb = None
    for (layers_of_stage, stage_noises, stage_mods, to_rgb), rgb_mod in zip(
      stages, rgb_mods
    ):
      for layer, layer_noise, mod in zip(
        layers_of_stage, stage_noises, stage_mods
      ):
        h = layer(h, noise=layer_noise, modulation=mod, styled=styled)
      rgb = to_rgb(h, skip=rgb, modulation=rgb_mod, styled=styled)
    return rgb


class CIPSres(CIPS):
  """The residual CIPS variant: residual blocks, one toRGB.

  The released Landscapes model is one. For size 256: a 1024 -> 512 modulated
  layer, 7 residual blocks (512 x5, 256, 128) and a final toRGB. 43,027,858
  parameters at the defaults.
  """

  width_table = staticmethod(widths_lib.res_widths)

  def build_layers(self):
    widths = self.layer_widths()
    self.blocks = [
      layers.StyledResBlock(
        fan_in,
        width,
        activation=self.activation,
        dtype=self.dtype,
        remat=self.remat,
        fused=self.fused,
      )
      for fan_in, width in zip(widths_lib.input_widths(widths), widths)
    ]
    self.to_rgb = layers.ToRGB(widths[-1], dtype=self.dtype, fused=self.fused)

  def modulated_layers(self):
    return [self.conv1, *self.blocks, self.to_rgb]

  def layers_after_conv1(self, h, noises, modulations, styled):
    # Each block takes two noise draws and its (conv1, conv2) modulations.
    block_mods, (rgb_mod,) = _split(modulations, len(self.blocks))
    for block, block_noises, mods in zip(
      self.blocks, _pairs(noises), block_mods
    ):
      h = block(h, noise=block_noises, modulations=mods, styled=styled)
    return self.to_rgb(h, modulation=rgb_mod, styled=styled)


def _pairs(items: Sequence) -> list[tuple]:
  """[a, b, c, d] -> [(a, b), (c, d)]: a stage's or a block's two layers."""
  return list(zip(items[0::2], items[1::2]))


def _split(items: Sequence, count: int) -> tuple[list, list]:
  return list(items[:count]), list(items[count:])
