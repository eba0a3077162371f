"""The CIPS discriminator: StyleGAN2's residual discriminator, in NHWC.

It follows rosinality's implementation.

Images are `(B, H, W, C)`; the model maps `(B, size, size, input_channels)` to
`(B, 1)` logits.

Layout of the network (reference names in brackets;
`convert.discriminator_layout` maps them; n = n_first_layers):

  from_rgb       1x1 ConvLayer, input_channels -> ch[size]  [convs.0]
  first_layers_i n x 3x3 ConvLayer at full resolution       [convs.1 .. convs.n]
  block_j        one ResBlock per size, size/2, ..., 8      [convs.n+1+j]
  (minibatch stddev: one extra channel, appended last)
  final_conv     3x3 ConvLayer, ch[4] + 1 -> ch[4]          [final_conv]
  final_dense    EqualDense(ch[4]) with fused leaky ReLU    [final_linear.0]
  logits         EqualDense(1)                              [final_linear.1]

Flatten order: the 4x4 feature map is flattened in its natural NHWC order,
(H, W, C). The reference flattens NCHW, (C, H, W), so the converter permutes the
input rows of `final_linear.0.weight` (see `convert.reference_flatten_order`);
no transpose is needed at run time.

Parameters are stored at unit scale (equalized learning rate) and scaled by
1/sqrt(fan_in) at run time, exactly as in the reference, so converted reference
weights are copied unchanged apart from layout.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import errors
from cips_jax import platforms
from cips_jax import precision as precision_lib
from cips_jax.layers import EqualDense
from cips_jax.layers import leaky_relu_gain
from cips_jax.layers import unit_normal_init

Array = jax.Array
DType = Any

# the reference adds this to the group variance before the sqrt
STDDEV_EPS = 1e-8
# Flax's layouts: NHWC activations and HWIO kernels (the converter transposes
# the reference's OIHW weights).
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def discriminator_channels(
  size: int, channel_multiplier: int = 2, max_channels: int = 512
) -> dict[int, int]:
  """Width of the feature map at each resolution 4 .. size.

  The reference's table, then capped. Returns {resolution: channels}; e.g.
  size 256, cm 2: {256: 128, 128: 256, 64..4: 512}.
  """
  # Keyed by resolution, unlike the generator's stage table
  # (docs/reference.md 1.6).
  table = {
    4: 512,
    8: 512,
    16: 512,
    32: 512,
    64: 256 * channel_multiplier,
    128: 128 * channel_multiplier,
    256: 64 * channel_multiplier,
    512: 32 * channel_multiplier,
    1024: 16 * channel_multiplier,
  }
  _check_size(size)
  if size not in table:
    raise errors.InputError(f'size must be at most 1024, got {size}')
  return {
    res: min(ch, max_channels) for res, ch in table.items() if res <= size
  }


def _check_size(size: int) -> None:
  if size < 4 or size & (size - 1):
    raise errors.InputError(f'size must be a power of 2 >= 4, got {size}')


def blur(x: Array, taps: Sequence[float], pad: tuple[int, int]) -> Array:
  """FIR filter of every channel (upfirdn2d with up = down = 1), zero padding.

  x: (B, H, W, C) -> (B, H + pad0 + pad1 - len(taps) + 1, ..., C). The 2-D
  kernel outer(k, k) / sum is separable, so it runs as len(taps) shifted adds
  along each axis: elementwise work that XLA fuses (a depthwise convolution is
  far slower on CPU). upfirdn2d convolves, so the taps are reversed (a no-op for
  the symmetric kernels used here).
  """
  k = np.asarray(taps, dtype=np.float64)
  # outer(k, k) / sum(outer(k, k)) = outer(k / sum k, k / sum k): each 1-D pass
  # uses the taps normalised to sum 1.
  k = (k / k.sum())[::-1]
  x = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
  n = len(k)
  height, width = x.shape[1] - n + 1, x.shape[2] - n + 1
  # Along H first, then along W; Python floats keep x's dtype.
  rows = sum(float(k[i]) * x[:, i : i + height] for i in range(n))
  return sum(float(k[j]) * rows[:, :, j : j + width] for j in range(n))


CONV_IMPLS = ('auto', 'xla', 'im2col')


def conv2d(
  x: Array,
  kernel: Array,
  stride: int,
  padding: int,
  precision: Any = None,
  impl: str = 'xla',
) -> Array:
  """NHWC x HWIO convolution, float32 output.

  Either XLA's convolution or im2col + one matmul. 'im2col' stacks the k*k
  shifted (strided) views of the padded input along channels and multiplies once
  by the (k*k*in, out) kernel. On XLA:CPU its forward and backward run faster
  than the native convolution at D's 64x64 and 32x32 levels, for k*k times the
  input's memory (docs/benchmarks.md, "Training step"); GPUs and TPUs keep the
  native one.
  """
  if impl == 'xla':
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSION_NUMBERS,
      precision=precision,
      preferred_element_type=jnp.float32,
    )
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  # Tap (dy, dx): the input pixel that kernel entry (dy, dx) sees from each
  # output position, for every output position at once (strided slice).
  taps = [
    jax.lax.slice(
      x,
      (0, dy, dx, 0),
      (
        x.shape[0],
        dy + (out_h - 1) * stride + 1,
        dx + (out_w - 1) * stride + 1,
        x.shape[3],
      ),
      (1, stride, stride, 1),
    )
    for dy in range(k)
    for dx in range(k)
  ]
  # Channels in (dy, dx, in) order: the row order of the HWIO kernel reshaped
  # to (k*k*in, out) below.
  columns = jnp.concatenate(taps, axis=-1)
  # One 2-D product over (B*H'*W') rows: with B, H', W' kept apart the weight
  # gradient contracts three axes, and XLA:CPU then transposes the whole column
  # matrix first.
  y = jnp.dot(
    columns.reshape(-1, columns.shape[-1]),
    kernel.reshape(-1, kernel.shape[-1]),
    # bf16 operands in the backward pass too (cips_jax.precision).
    precision=(
      precision_lib.for_products(x.dtype) if precision is None else precision
    ),
    preferred_element_type=jnp.float32,
  )
  return y.reshape(columns.shape[:3] + (kernel.shape[-1],))


# 'auto': im2col on CPUs, where it is faster (docs/benchmarks.md, "Training
# step"); XLA's own convolution on accelerators.
CONV_IMPL_BY_BACKEND = {'cpu': 'im2col'}
DEFAULT_CONV_IMPL = 'xla'


def resolve_conv_impl(impl: str, backend: Optional[str] = None) -> str:
  """`impl`, or for 'auto' the choice of `backend` (default: jax's default).

  For reports; inside a program, EqualConv2d resolves 'auto' for the platform
  the program is lowered for (`platforms.dispatch`).
  """
  if impl not in CONV_IMPLS:
    raise errors.InputError(
      f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}'
    )
  if impl == 'auto':
    return platforms.resolve(CONV_IMPL_BY_BACKEND, DEFAULT_CONV_IMPL, backend)
  return impl


class EqualConv2d(nn.Module):
  """2-D convolution with StyleGAN2's equalized learning rate.

  The stored kernel is N(0, 1) in Flax layout (kh, kw, in, out) and multiplied
  at run time by 1/sqrt(in * kh * kw).
  x: (B, H, W, in) -> (B, H', W', features), float32.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: stride on H and W.
    padding: zero padding on each side of H and W.
    use_bias: add a learned bias (initialised to 0).
    dtype: dtype of the convolution inputs (accumulation and output are
      float32).
    precision: `jax.lax.Precision` for the convolution (None = backend default).
    conv_impl: 'auto', 'xla' or 'im2col' (see `conv2d`).
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: DType = jnp.float32
  precision: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, H, W, in) -> (B, H', W', features)."""
    # A conv's fan-in counts the whole receptive field: in * kh * kw.
    fan_in = x.shape[-1] * self.kernel_size**2
    kernel = self.param(
      'kernel',
      unit_normal_init(),
      (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
    )
    kernel = kernel * (1.0 / math.sqrt(fan_in))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)

    def convolve(impl):
      return conv2d(x, kernel, self.stride, self.padding, self.precision, impl)

    if self.conv_impl == 'auto':
      # Staged per convolution, not around all of D: jax traces (and, for
      # gradients, linearises) every branch, so a branch holding all of D
      # would trace it once per choice. Under a mesh only one branch is
      # traced (`parallel.tracing_over`; docs/benchmarks.md, "Tracing").
      y = platforms.dispatch(CONV_IMPL_BY_BACKEND, DEFAULT_CONV_IMPL, convolve)
    else:
      y = convolve(resolve_conv_impl(self.conv_impl))  # checks the name
    # Unscaled: the reference's EqualConv2d has no lr_mul.
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y


class ConvLayer(nn.Module):
  """The reference ConvLayer.

  [blur] -> EqualConv2d -> [bias + leaky ReLU(0.2) * sqrt 2].

  With `downsample`, the input is first blurred with padding ((p+1)//2, p//2),
  p = len(blur_kernel) - 2 + (k - 1), then convolved with stride 2 and no
  padding, so H -> H/2. Otherwise the conv has stride 1 and padding (k-1)//2
  (H is kept). With `activate`, the conv has no bias and a per-channel bias
  (param `bias`, init 0) is added before the activation (FusedLeakyReLU);
  without it, the conv bias follows `use_bias`.

  Params: `conv/kernel` (k, k, in, out) [, `conv/bias`] [, `bias` (out,)].
  x: (B, H, W, in) -> (B, H or H/2, W or W/2, features), float32.
  """

  features: int
  kernel_size: int
  downsample: bool = False
  use_bias: bool = True
  activate: bool = True
  blur_kernel: tuple = (1, 3, 3, 1)
  dtype: DType = jnp.float32
  precision: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, H, W, in) -> (B, H', W', features)."""
    if self.downsample:
      # rosinality's padding for a blur before a stride-2 k x k conv:
      # (len(taps) - factor 2) + (k - 1), so that the conv gives H / 2.
      p = len(self.blur_kernel) - 2 + (self.kernel_size - 1)
      x = blur(x.astype(self.dtype), self.blur_kernel, ((p + 1) // 2, p // 2))
      stride, padding = 2, 0
    else:
      stride, padding = 1, (self.kernel_size - 1) // 2
    y = EqualConv2d(
      self.features,
      self.kernel_size,
      stride=stride,
      padding=padding,
      # With the activation, the bias is FusedLeakyReLU's (added below).
      use_bias=self.use_bias and not self.activate,
      dtype=self.dtype,
      precision=self.precision,
      conv_impl=self.conv_impl,
      name='conv',
    )(x)
    if self.activate:
      y = leaky_relu_gain(
        y + self.param('bias', nn.initializers.zeros, (self.features,))
      )
    return y


class ResBlock(nn.Module):
  """Residual downsampling block: (conv2(conv1(x)) + skip(x)) / sqrt 2.

  conv1: 3x3 in -> in; conv2: blur + 3x3 stride-2 in -> features; skip: blur +
  1x1 stride-2 in -> features, no bias, no activation.
  x: (B, H, W, in) -> (B, H/2, W/2, features).
  """

  features: int
  blur_kernel: tuple = (1, 3, 3, 1)
  dtype: DType = jnp.float32
  precision: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, H, W, in) -> (B, H/2, W/2, features)."""
    kw = dict(
      blur_kernel=self.blur_kernel,
      dtype=self.dtype,
      precision=self.precision,
      conv_impl=self.conv_impl,
    )
    # conv1 keeps the input width; conv2 changes it while halving H and W.
    h = ConvLayer(x.shape[-1], 3, name='conv1', **kw)(x)
    h = ConvLayer(self.features, 3, downsample=True, name='conv2', **kw)(h)
    skip = ConvLayer(
      self.features,
      1,
      downsample=True,
      activate=False,
      use_bias=False,
      name='skip',
      **kw,
    )(x)
    # / sqrt(2): the sum of two unit-scale branches back to unit scale.
    return (h + skip) * (1.0 / math.sqrt(2.0))


def minibatch_stddev(x: Array, group_size: int = 4) -> Array:
  """Appends the reference's minibatch standard deviation as one last channel.

  x: (B, H, W, C) -> (B, H, W, C + 1). G = min(B, group_size); B must be
  divisible by G. As the reference's NCHW `x.view(G, B // G, 1, C, H, W)`:
  sample b = g * (B // G) + m, and each group {g * (B // G) + m : g} (fixed m)
  gets std = sqrt(biased var over g + 1e-8), averaged over C, H, W. Computed in
  float32.
  """
  batch = x.shape[0]
  group = min(batch, group_size)
  if batch % group:
    raise errors.InputError(
      f'batch size {batch} must be divisible by the stddev group size {group} '
      f'(min(batch, stddev_group={group_size}))'
    )
  xf = x.astype(jnp.float32)
  # (G, M, H, W, C); g is outer, as in the reference's view(G, -1, ...).
  y = xf.reshape((group, batch // group) + x.shape[1:])
  # jnp.var's default ddof=0 is the reference's var(0, unbiased=False).
  std = jnp.sqrt(jnp.var(y, axis=0) + STDDEV_EPS)  # (M, H, W, C)
  std = jnp.mean(std, axis=(1, 2, 3))  # (M,)
  std = jnp.tile(std, group)  # sample b gets std[b % M]
  feature = jnp.broadcast_to(std[:, None, None, None], x.shape[:3] + (1,))
  return jnp.concatenate([xf, feature], axis=-1)


class Discriminator(nn.Module):
  """StyleGAN2 residual discriminator as used by CIPS (NHWC).

  Attributes:
    size: input resolution (power of 2, 4 .. 1024). CIPS builds it with the crop
      size.
    channel_multiplier: widens resolutions >= 64 (see `discriminator_channels`).
    input_channels: 3 (RGB, `--img2dis`) or 5 (RGB + 2 coordinate channels).
    n_first_layers: extra 3x3 ConvLayers at the input resolution.
    blur_kernel: 1-D taps of the anti-aliasing filter.
    stddev_group: minibatch-stddev group size (the batch must be divisible by
      min(B, it)).
    max_channels: cap on every width (512 reproduces the reference; smaller for
      tests).
    dtype: compute dtype of the convolutions (params and accumulation stay
      float32; the two final dense layers run in float32 because they are tiny).
    precision: `jax.lax.Precision` for the convolutions (None = backend
      default).
    conv_impl: 'auto' (im2col on CPU, XLA's convolution elsewhere), 'xla' or
      'im2col'.

  Call: images (B, size, size, input_channels) -> logits (B, 1) float32.
  """

  size: int
  channel_multiplier: int = 2
  input_channels: int = 3
  n_first_layers: int = 0
  blur_kernel: tuple = (1, 3, 3, 1)
  stddev_group: int = 4
  max_channels: int = 512
  dtype: DType = jnp.float32
  precision: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images: (B, size, size, input_channels) -> (B, 1)."""
    expected = (self.size, self.size, self.input_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise errors.InputError(
        f'images must have shape (B, {self.size}, {self.size}, '
        f'{self.input_channels}), got {images.shape}'
      )
    ch = discriminator_channels(
      self.size, self.channel_multiplier, self.max_channels
    )
    kw = dict(
      blur_kernel=tuple(self.blur_kernel),
      dtype=self.dtype,
      precision=self.precision,
      conv_impl=self.conv_impl,
    )

    x = ConvLayer(ch[self.size], 1, name='from_rgb', **kw)(images)
    for i in range(self.n_first_layers):
      x = ConvLayer(ch[self.size], 3, name=f'first_layers_{i}', **kw)(x)
    res = self.size
    j = 0
    while res > 4:  # log2 resolution from log2(size) down to 3
      x = ResBlock(ch[res // 2], name=f'block_{j}', **kw)(x)
      res //= 2
      j += 1

    x = minibatch_stddev(x, self.stddev_group)  # (B, 4, 4, ch[4] + 1)
    x = ConvLayer(ch[4], 3, name='final_conv', **kw)(x)  # (B, 4, 4, ch[4])
    # Natural (H, W, C) flatten; the converter permutes the reference's (C, H,
    # W) rows.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    # (B, 16 * ch[4]) -> (B, ch[4]) with fused leaky ReLU, then one logit.
    x = EqualDense(ch[4], activate=True, name='final_dense')(x)
    return EqualDense(1, name='logits')(x)
