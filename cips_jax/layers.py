"""Layers of the CIPS generator, written for ONE pixel.

Every layer here takes the features of a single pixel (a vector) and the style
that drives it. The generator `vmap`s them over pixels and images. A per-image
style's affine and demodulation run once per image (the generator computes each
layer's `Modulation` before the vmap, or JAX leaves the unmapped style
unbatched), while the pixel work becomes one matrix multiply per layer.

Parameters follow Flax conventions (dense kernels are `(in, out)`);
`cips_jax.convert` maps the reference's PyTorch layout onto them. The equalized
learning rate of StyleGAN2 is kept: weights are stored at unit scale and
multiplied by `lr_mul / sqrt(fan_in)` at run time.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cips_jax import errors
from cips_jax import precision
from cips_jax.kernels import fused_pixel

Array = jax.Array
DType = Any

# The gain of the fused leaky ReLU (He's gain for a ReLU) and the
# divisor of residual sums of two unit-variance branches: both keep unit scale.
SQRT2 = math.sqrt(2.0)
DEMODULATION_EPS = 1e-8  # the literal the reference adds under its rsqrt


def leaky_relu_gain(x: Array) -> Array:
  """Leaky ReLU with slope 0.2, then the gain sqrt(2).

  StyleGAN2's fused_lrelu.
  """
  # The caller adds the bias first (docs/reference.md 1.3).
  return jax.nn.leaky_relu(x, 0.2) * SQRT2


def _pixel_norm(x: Array, axis: int = -1) -> Array:
  """Normalises `x` to unit root-mean-square along `axis`.

  eps is 1e-8, as in the reference.
  """
  # The mean, not the sum: unit RMS whatever style_dim (docs/reference.md 1.5).
  return x * jax.lax.rsqrt(
    jnp.mean(jnp.square(x), axis=axis, keepdims=True) + 1e-8
  )


def unit_normal_init(lr_mul: float = 1.0):
  """N(0, 1) / lr_mul: the stored value of an equalized-learning-rate weight."""

  def init(key, shape, dtype=jnp.float32):
    # Used x lr_mul, so the initial effective weight is N(0, 1) / sqrt(fan_in)
    # whatever lr_mul, while Adam's steps on it shrink by lr_mul.
    return jax.random.normal(key, shape, dtype) / lr_mul

  return init


class EqualDense(nn.Module):
  """Dense layer with StyleGAN2's equalized learning rate.

  y = x @ (kernel * lr_mul / sqrt(in)) + bias * lr_mul, optionally followed by
  `leaky_relu_gain` (the reference's `fused_lrelu`, whose bias is added before
  the activation).

  Attributes:
    features: output width.
    lr_mul: learning-rate multiplier (0.01 in the mapping network).
    bias_init: initial value of the stored bias (1.0 for style affines).
    use_bias: whether there is a bias.
    activate: apply leaky ReLU (0.2) with gain sqrt(2).
  """

  features: int
  lr_mul: float = 1.0
  bias_init: float = 0.0
  use_bias: bool = True
  activate: bool = False

  @nn.compact
  def __call__(self, x: Array, *, anchor: Optional[Array] = None) -> Array:
    """x: (..., in) -> (..., features).

    `anchor`: an optional scalar that is exactly 0 (see `ordering_anchor`),
    added to the kernel so that the product waits for the value the anchor was
    computed from.
    """
    fan_in = x.shape[-1]
    kernel = self.param(
      'kernel', unit_normal_init(self.lr_mul), (fan_in, self.features)
    )
    if anchor is not None:
      # + 0.0: no value changes, only the product's dependence on the anchor.
      kernel = kernel + anchor
    # Scaled at run time (equalized learning rate), so converted reference
    # weights are copied unchanged.
    y = x @ (kernel * (self.lr_mul / math.sqrt(fan_in)))
    if self.use_bias:
      bias = self.param(
        'bias', nn.initializers.constant(self.bias_init), (self.features,)
      )
      # lr_mul but no fan-in scale, as the reference's EqualLinear; its
      # fused_lrelu also adds the bias before the activation.
      y = y + bias * self.lr_mul
    return leaky_relu_gain(y) if self.activate else y


class Modulation(NamedTuple):
  """A modulated layer's style terms.

  Either the input scales and the output demodulation (or None), applied to
  the activations; or, for one image's style, `weight`: the layer's kernel
  with both folded in (the reference's own form), then scale and inv_norm are
  None.
  """

  scale: Optional[Array]
  inv_norm: Optional[Array]
  weight: Optional[Array] = None


class PixelStyle(NamedTuple):
  """The style one pixel's layers take (unless given their `Modulation`).

  style: (D,) or, with mix (K,) (this pixel's weights), K styles (K, D).
  pixel_axes: names of the caller's vmapped axes, given when the style (or
  `mix`) varies per pixel: each layer then orders its style work after its
  input (see `ordering_anchor`), which never changes the result.
  """

  style: Optional[Array] = None
  mix: Optional[Array] = None
  pixel_axes: tuple[str, ...] = ()


class ModulatedDense(nn.Module):
  """A 1x1 modulated convolution (StyleGAN2) for one pixel.

  It modulates the activations, not the weight. The reference builds, per style
  s, the weight W'[o, i] = c W[o, i] s[i] (c = 1/sqrt(in)) and demodulates it by
  d[o] = rsqrt(sum_i W'[o, i]^2 + 1e-8). For one pixel that equals

      y = ((x * s) @ (c W)) * rsqrt((s * s) @ (c W)^2 + 1e-8),

  which never builds a weight per style. `style` may be one w (per image or,
  under vmap, per pixel) or K styles `(K, D)` mixed by `mix` `(K,)` (weights of
  this pixel). The affine is affine in w, so the mixed style is `mix @ s_k`; the
  squared norm under the demodulation is quadratic in it, so it is `mix^T G mix`
  with G[k, l] = (s_k * s_l) @ (c W)^2, computed once per image: K styles and
  K^2 demodulation vectors per layer, whatever the pixel count.

  The pair (s, rsqrt(...)) is this layer's `Modulation`. `modulation_for(w)`
  computes it for any leading shape of w, so a caller can compute it once per
  image and hand it to every pixel.

  Attributes:
    in_features: input width.
    features: output width.
    demodulate: divide each output by the norm of its modulated weight row.
    dtype: dtype of the matrix-multiply inputs (accumulation is always float32).
  """

  in_features: int
  features: int
  demodulate: bool = True
  dtype: DType = jnp.float32

  def setup(self):
    # (in, out): the reference's (1, out, in, 1, 1) weight, transposed.
    self.kernel = self.param(
      'kernel', unit_normal_init(), (self.in_features, self.features)
    )
    # The style affine A(w); its bias starts at 1, so the initial styles scale
    # the inputs around 1, not around 0 (docs/reference.md 1.2).
    self.modulation = EqualDense(self.in_features, bias_init=1.0)

  def scaled_kernel(self) -> Array:
    """c W (in, out), c = 1/sqrt(in): the kernel the modulation scales."""
    return self.kernel * (1.0 / math.sqrt(self.in_features))

  def modulation_for(
    self,
    style: Array,
    mix: Optional[Array] = None,
    anchor: Optional[Array] = None,
    *,
    fold_weights: bool = False,
  ) -> Modulation:
    """The input scales and output demodulation for `style`.

    style (..., D) -> Modulation(scale (..., in), inv_norm (..., out) or None);
    with `mix` (K,) for this pixel, style is (K, D) and the result is this
    pixel's (in,) and (out,). `fold_weights` (one style per image, no `mix`):
    the same terms folded into one weight per style (`folded`).
    """
    if fold_weights:
      return self.folded(self.modulation_for(style, anchor=anchor))
    if mix is None:
      scale = self.modulation(style, anchor=anchor)  # (..., in)
    else:
      styles = self.modulation(style)  # (K, in): once per image
      scale = _weighted_sum(mix, styles)  # (in,): this pixel's style
    if not self.demodulate:
      return Modulation(scale, None)
    # sum_i (c W[i, o] s[i])^2 = (s * s) @ (c W)^2: each modulated weight's
    # squared column norm, without building the weight.
    kernel_sq = jnp.square(self.scaled_kernel())
    if mix is None:
      norm_sq = jnp.square(scale) @ kernel_sq  # (..., out)
    else:
      k = styles.shape[0]
      # s_k * s_l for all K^2 pairs, flat so that one product gives the Gram.
      pair_products = (styles[:, None, :] * styles[None, :, :]).reshape(
        k * k, self.in_features
      )
      gram = pair_products @ kernel_sq  # (K*K, out): once per image
      # (out,): sum over (k, l) of mix_k mix_l G[k, l], i.e. mix^T G mix.
      norm_sq = _weighted_sum(jnp.outer(mix, mix).reshape(k * k), gram)
    # The reference's literal 1e-8, not its unused `eps` attribute
    # (docs/reference.md 1.2).
    return Modulation(scale, jax.lax.rsqrt(norm_sq + DEMODULATION_EPS))

  def folded(self, modulation: Modulation) -> Modulation:
    """The per-image weight form of `modulation` (one style per image).

    scale (..., in), inv_norm (..., out) -> weight (..., in, out) =
    c W * scale[:, None] * inv_norm[None, :], in this layer's dtype: B copies
    of the kernel for B images, never one per pixel.
    """
    # W''[i, o] = c W[i, o] s[i] d[o]: the reference's per-sample weight,
    # transposed to (in, out).
    weight = self.scaled_kernel() * modulation.scale[..., :, None]
    if modulation.inv_norm is not None:
      weight = weight * modulation.inv_norm[..., None, :]
    return Modulation(None, None, weight.astype(self.dtype))

  def __call__(
    self,
    x: Array,
    *,
    styled: PixelStyle = PixelStyle(),
    modulation: Optional[Modulation] = None,
  ) -> Array:
    """x: (in,) -> (features,) float32.

    `styled`: this pixel's `PixelStyle`; or `modulation`, its precomputed
    `Modulation` (then `styled` is unused).
    """
    if modulation is None:
      style, mix, pixel_axes = styled
      anchor = ordering_anchor(x, pixel_axes) if pixel_axes else None
      # A mixture's K affines are per image and need no ordering (the mix
      # branch of modulation_for ignores `anchor`): order the per-pixel mix.
      if mix is not None and anchor is not None:
        mix, anchor = mix + anchor, None
      modulation = self.modulation_for(style, mix, anchor)
    if modulation.weight is not None:
      # The folded form: modulation and demodulation live in the weight.
      return jnp.dot(
        x.astype(self.dtype),
        modulation.weight.astype(self.dtype),
        precision=precision.for_products(self.dtype),
        preferred_element_type=jnp.float32,
      )
    # Modulate the input, multiply by the shared kernel, demodulate the output:
    # the folded weight's result with one kernel for every style. float32
    # accumulation even for bfloat16 inputs.
    y = jnp.dot(
      (x * modulation.scale).astype(self.dtype),
      self.scaled_kernel().astype(self.dtype),
      # bf16 operands in the backward pass too (cips_jax.precision).
      precision=precision.for_products(self.dtype),
      preferred_element_type=jnp.float32,
    )
    return y if modulation.inv_norm is None else y * modulation.inv_norm


def _weighted_sum(weights: Array, rows: Array) -> Array:
  """sum_k weights[k] * rows[k].

  `weights` (K,) are per pixel and `rows` (K, C) per image. Written as K
  elementwise terms rather than a (K,) @ (K, C) product so that XLA fuses the
  blend into the elementwise op that consumes it: a mixture then costs no
  (pixels, C) buffer.
  """
  total = weights[0] * rows[0]
  for k in range(1, rows.shape[0]):
    total = total + weights[k] * rows[k]
  return total


def ordering_anchor(x: Array, axes: tuple[str, ...]) -> Array:
  """A scalar that is exactly 0.0 but computed from x over the vmapped `axes`.

  Per-pixel styles and mixture weights do not depend on the activations, so XLA
  is free to compute every layer's per-pixel modulation and demodulation up
  front and keep them all alive at once (gigabytes at 256^2). Adding this anchor
  to the (small) affine kernel or the (small) mixture weights makes a layer's
  style work wait for its input x, so only one layer's temporaries are alive. It
  reduces one channel over all pixels (cheap), compares it with itself (so a NaN
  pixel cannot leak into other pixels) and multiplies by 0, which XLA does not
  fold away for floats.
  """
  # A psum over every vmapped axis is itself unbatched: the kernel it is added
  # to stays one kernel, not one per pixel.
  total = jax.lax.psum(x[0], axes)
  # 0 * total would be NaN for an inf or NaN total; the comparison is 0 or 1,
  # so the anchor is exactly 0 always.
  return 0.0 * (total != total).astype(x.dtype)


class _StyledThroughModulatedDense:
  """A layer whose style enters through its `modulated` ModulatedDense
  (StyledDense, ToRGB): the one home of `modulation_for`."""

  def modulation_for(
    self, style: Array, *, fold_weights: bool = False
  ) -> Modulation:
    """style (..., D) -> this layer's Modulation for each style.

    See ModulatedDense; `fold_weights` gives the per-image weight form.
    """
    return self.modulated.modulation_for(style, fold_weights=fold_weights)


class _StyledLayer(nn.Module):
  """The fields of a styled layer and of a block of them (see StyledDense)."""

  in_features: int
  features: int
  activation: Optional[str] = None
  dtype: DType = jnp.float32
  remat: bool = False
  fused: bool = False

  def styled_dense(self, in_features: int, features: int) -> 'StyledDense':
    """A StyledDense computing as this layer does."""
    return StyledDense(
      in_features,
      features,
      activation=self.activation,
      dtype=self.dtype,
      remat=self.remat,
      fused=self.fused,
    )


class StyledDense(_StyledThroughModulatedDense, _StyledLayer):
  """ModulatedDense, then noise injection, then bias and activation.

  The reference's StyledConv.

  Attributes:
    in_features: input width.
    features: output width.
    activation: None (bias + leaky ReLU x sqrt 2, the released models), 'sin'
      (sin(x + bias)), or 'sinrelu' (bias, then leaky ReLU of the even channels
      and sin of the odd channels, concatenated in that order and multiplied by
      sqrt 2; this reorders the channels exactly as the reference does).
    dtype: matrix-multiply input dtype.
    remat: recompute this layer in the backward pass instead of storing its
      activations.
    fused: with a precomputed per-image `Modulation` (the generator's 'fused'
      form), run the layer as `kernels.fused_pixel.styled_dense`, one Pallas
      kernel for all pixels and images under the generator's vmaps. Sine
      activations and per-pixel styles keep the formula below.
  """

  def setup(self):
    self.modulated = ModulatedDense(
      self.in_features, self.features, dtype=self.dtype
    )
    # The reference draws the noise inside the layer; its learned strength
    # starts at 0. One scalar per layer: the noise is one value per pixel,
    # shared by the channels (the reference's NoiseInjection).
    self.noise_strength = self.param(
      'noise_strength', nn.initializers.zeros, ()
    )
    # The activation's bias (`.activate.bias`); the modulated layer has none.
    self.bias = self.param('bias', nn.initializers.zeros, (self.features,))

  def __call__(
    self,
    x: Array,
    *,
    styled: PixelStyle = PixelStyle(),
    noise: Optional[Array] = None,
    modulation: Optional[Modulation] = None,
  ) -> Array:
    """x: (in,) -> (features,).

    noise: () standard normal for this pixel, or None. Either `styled` or this
    pixel's precomputed `modulation`. The output is stored in
    `dtype` (bfloat16 activations between layers when computing in bfloat16);
    the noise, bias and activation are computed in float32 first.
    """

    def forward(module, x, style, mix, noise, modulation):
      if module.uses_kernel(modulation):
        return fused_pixel.styled_dense(
          x.astype(module.dtype),
          module.modulated.scaled_kernel(),
          modulation.scale,
          modulation.inv_norm,
          module.bias,
          noise=noise,
          noise_strength=None if noise is None else module.noise_strength,
          activation='lrelu',
          out_dtype=module.dtype,
        )
      y = module.modulated(
        x, styled=PixelStyle(style, mix, pixel_axes), modulation=modulation
      )
      # Noise before the bias and activation, as the reference's StyledConv.
      if noise is not None:
        y = y + module.noise_strength * noise
      y = apply_activation(y + module.bias, module.activation)
      return y.astype(module.dtype)

    # The lifted remat sees arrays only: pixel_axes stays in the closure.
    style, mix, pixel_axes = styled
    if self.remat:
      forward = nn.remat(forward)
    return forward(self, x, style, mix, noise, modulation)

  def uses_kernel(self, modulation: Optional[Modulation]) -> bool:
    """Whether this call runs the fused kernel (the kernel has leaky ReLU)."""
    return self.activation is None and _fusable(self.fused, modulation)


def _fusable(fused: bool, modulation: Optional[Modulation]) -> bool:
  """Whether a fused layer takes the kernel: a per-image scale, not folded."""
  return fused and modulation is not None and modulation.scale is not None


def apply_activation(y: Array, activation: Optional[str]) -> Array:
  """The three activations of the reference's StyledConv.

  The bias is already added.
  """
  if activation is None:
    return leaky_relu_gain(y)
  if activation == 'sin':
    return jnp.sin(y)  # no gain, as the reference
  if activation == 'sinrelu':
    # Leaky half first, then sin, both x sqrt(2): the reference's channel
    # order (docs/reference.md 6.7).
    return (
      jnp.concatenate(
        [jax.nn.leaky_relu(y[..., 0::2], 0.2), jnp.sin(y[..., 1::2])], axis=-1
      )
      * SQRT2
    )
  raise errors.InputError(
    f"activation must be None, 'sin' or 'sinrelu', got {activation!r}"
  )


class ToRGB(_StyledThroughModulatedDense, nn.Module):
  """Modulated 1x1 projection to RGB without demodulation.

  It adds a bias (and a skip).
  """

  in_features: int
  dtype: DType = jnp.float32
  fused: bool = False  # see StyledDense

  def setup(self):
    # No demodulation: the output keeps the style's scale (docs/reference.md
    # 1.4).
    self.modulated = ModulatedDense(
      self.in_features, 3, demodulate=False, dtype=self.dtype
    )
    self.bias = self.param('bias', nn.initializers.zeros, (3,))

  def __call__(
    self,
    x: Array,
    *,
    styled: PixelStyle = PixelStyle(),
    skip: Optional[Array] = None,
    modulation: Optional[Modulation] = None,
  ) -> Array:
    """x: (in,) -> (3,); adds `skip` (3,) when given."""
    if _fusable(self.fused, modulation):
      rgb = fused_pixel.styled_dense(
        x.astype(self.dtype),
        self.modulated.scaled_kernel(),
        modulation.scale,
        None,
        self.bias,
        activation=None,
        out_dtype=jnp.float32,
      )
    else:
      rgb = self.modulated(x, styled=styled, modulation=modulation) + self.bias
    # CIPSskip's running sum: no upsampling, unlike StyleGAN2's ToRGB skip.
    return rgb if skip is None else rgb + skip


class MappingNetwork(nn.Module):
  """z -> w: pixel norm, then `n_mlp` equalized dense layers.

  The layers have lr_mul 0.01 and leaky ReLU x sqrt 2.

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
    # The reference's style.0; the dense layers are style.1 .. style.n_mlp.
    x = _pixel_norm(z)
    for i in range(self.n_mlp):
      x = EqualDense(
        self.style_dim, lr_mul=self.lr_mul, activate=True, name=f'dense_{i}'
      )(x)
    return x


class StyledResBlock(_StyledLayer):
  """(conv2(conv1(x)) + skip(x)) / sqrt(2).

  skip is a 1x1 equalized projection if the widths differ, else the identity.
  """

  def setup(self):
    self.conv1 = self.styled_dense(self.in_features, self.features)
    self.conv2 = self.styled_dense(self.features, self.features)
    # The reference's bias-free equalized 1x1 projection (`skip.0`), only
    # where the widths change.
    if self.in_features != self.features:
      self.skip = EqualDense(self.features, use_bias=False)

  def modulation_for(self, style, *, fold_weights: bool = False):
    """style (..., D) -> the Modulations of conv1 and conv2."""
    return tuple(
      conv.modulation_for(style, fold_weights=fold_weights)
      for conv in (self.conv1, self.conv2)
    )

  def __call__(
    self,
    x,
    *,
    styled: PixelStyle = PixelStyle(),
    noise=(None, None),
    modulations=None,
  ):
    """x: (in,) -> (features,); noise: two per-pixel draws (or Nones)."""
    mods = (None, None) if modulations is None else modulations
    h = self.conv1(x, noise=noise[0], modulation=mods[0], styled=styled)
    h = self.conv2(h, noise=noise[1], modulation=mods[1], styled=styled)
    skip = x if self.in_features == self.features else self.skip(x)
    # / sqrt(2) keeps the sum of two unit-scale branches at unit scale; the
    # result is stored in `dtype`, as StyledDense's outputs are.
    return ((h + skip) / SQRT2).astype(self.dtype)
