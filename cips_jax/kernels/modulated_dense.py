"""A fused Pallas kernel for a style-modulated 1x1 layer with per-image styles.

For B images of P pixels, one `pallas_call` computes

    y[b, p] = act(((x[b, p] * scale[b]) @ kernel) * inv_norm[b]
                  + noise_strength * noise[b, p] + bias)

reading the activations once and writing the result once: the modulation, the
demodulation, the noise, the bias and the activation are applied to the float32
accumulator of each output block before it is stored, instead of as separate
elementwise passes over (B, P, OUT) arrays. `styled_dense_reference` is the same
formula in plain jnp (unfused); it defines the result and the gradient.

This is the kernel form of `layers.StyledDense` (act='lrelu') and `layers.ToRGB`
(no demodulation, act=None) for per-image styles. It works on whole (B, P, IN)
arrays, so a caller runs it outside the per-pixel vmap: compute each layer's
`Modulation` per image (B, IN) and (B, OUT), then call this on the stacked
pixels.

Backends: compiled with Triton on GPU and Mosaic on TPU; on CPU, where Pallas
cannot compile, `interpret=None` runs the kernel in interpret mode (slow, for
tests). The gradient is a custom VJP whose backward pass is the VJP of the
unfused reference (plain jnp, recomputed from the inputs; nothing the size of
the activations is saved besides the inputs themselves).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from cips_jax import errors
from cips_jax import precision

Array = jax.Array
DType = Any

# The same leaky ReLU as layers.leaky_relu_gain (slope 0.2, gain sqrt 2). Kept
# here rather than imported so that the layers could use this kernel.
_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)
_ACTIVATIONS = ('lrelu', None)

# The kernels `fused_styled_dense` builds: Triton for GPUs, Mosaic for TPUs, or
# Pallas's interpreter (any backend; CPUs have no Pallas compiler).
BACKENDS = ('gpu', 'tpu', 'interpret')
# Which kernel each platform that jax lowers for runs (lax.platform_dependent's
# names): CUDA and ROCm GPUs take Triton.
KERNEL_BACKEND_BY_PLATFORM = {
  'cpu': 'interpret',
  'cuda': 'gpu',
  'rocm': 'gpu',
  'tpu': 'tpu',
}


def _default_kernel_backend() -> str:
  """The kernel of jax's default backend: 'gpu', 'tpu' or 'interpret'."""
  backend = jax.default_backend()
  return backend if backend in ('gpu', 'tpu') else 'interpret'


# Triton needs every block to have a power-of-two size, and its dots want at
# least 16 rows and columns. Block sizes are therefore powers of two >= 16;
# Mosaic's rule (last two block dims multiples of (8, 128) or the full array
# dims) is met by those on the pixel axis and handled on the output axis below.
_MIN_BLOCK = 16
# Chunk of the input features per dot inside the kernel (GPU and interpret): a
# whole IN = 1024 column of the kernel times 128 outputs would not fit in a
# GPU's shared memory, so the kernel loops over IN in chunks and accumulates.
_MAX_BLOCK_IN = 64


def _lrelu(y: Array) -> Array:
  return jnp.where(y >= 0, y, _LRELU_SLOPE * y) * _LRELU_GAIN


def _activate(y: Array, activation: Optional[str]) -> Array:
  return _lrelu(y) if activation == 'lrelu' else y


def styled_dense_reference(
  x: Array,
  kernel: Array,
  scale: Array,
  inv_norm: Optional[Array],
  bias: Array,
  *,
  noise: Optional[Array] = None,
  noise_strength: Optional[Array] = None,
  activation: Optional[str] = 'lrelu',
  out_dtype: Optional[DType] = None,
) -> Array:
  """The unfused formula that `fused_styled_dense` computes, in plain jnp.

  Args:
    x: (B, P, IN) activations, float32 or bfloat16.
    kernel: (IN, OUT) float32, already scaled by 1/sqrt(IN)
      (`ModulatedDense.scaled_kernel()`).
    scale: (B, IN) float32 input style scales.
    inv_norm: (B, OUT) float32 demodulation, or None (no demodulation).
    bias: (OUT,) float32.
    noise: (B, P) float32 per-pixel noise, or None.
    noise_strength: () float32; required with `noise`.
    activation: 'lrelu' (leaky ReLU 0.2 times sqrt 2) or None (identity).
    out_dtype: dtype of the result; default x.dtype.

  Returns:
    (B, P, OUT) in out_dtype. As in `layers.ModulatedDense`, x * scale is
    rounded to x.dtype before the product, which accumulates in float32; the
    rest is float32 until the final cast.
  """
  _check_arguments(x, kernel, scale, inv_norm, bias, noise, noise_strength)
  _check_activation(activation)
  modulated = (x.astype(jnp.float32) * scale[:, None, :]).astype(x.dtype)
  y = jnp.einsum(
    'bpi,io->bpo',
    modulated,
    kernel.astype(x.dtype),
    # The gradient (the kernel's VJP) keeps bf16 operands (cips_jax.precision).
    precision=precision.for_products(x.dtype),
    preferred_element_type=jnp.float32,
  )
  if inv_norm is not None:
    y = y * inv_norm[:, None, :]
  if noise is not None:
    y = y + noise_strength * noise[..., None]
  y = _activate(y + bias, activation)
  return y.astype(x.dtype if out_dtype is None else out_dtype)


def fused_styled_dense(
  x: Array,
  kernel: Array,
  scale: Array,
  inv_norm: Optional[Array],
  bias: Array,
  *,
  noise: Optional[Array] = None,
  noise_strength: Optional[Array] = None,
  activation: Optional[str] = 'lrelu',
  out_dtype: Optional[DType] = None,
  block_pixels: int = 128,
  block_out: int = 128,
  interpret: Optional[bool] = None,
  backend: Optional[str] = None,
) -> Array:
  """A style-modulated 1x1 layer for per-image styles, as one Pallas kernel.

  y[b, p] = act(((x[b, p] * scale[b]) @ kernel) * inv_norm[b]
                + noise_strength * noise[b, p] + bias)

  Args:
    x: (B, P, IN) activations, float32 or bfloat16.
    kernel: (IN, OUT) float32, already scaled by 1/sqrt(IN)
      (`ModulatedDense.scaled_kernel()`).
    scale: (B, IN) float32 input style scales.
    inv_norm: (B, OUT) float32 demodulation, or None (no demodulation: ToRGB).
    bias: (OUT,) float32.
    noise: (B, P) float32 per-pixel noise, or None.
    noise_strength: () float32; required with `noise`.
    activation: 'lrelu' (leaky ReLU 0.2 times sqrt 2, `layers.leaky_relu_gain`)
      or None (identity). Note: `layers.StyledDense.activation=None` means
      'lrelu' here.
    out_dtype: dtype of the result; default x.dtype.
    block_pixels: pixels per block, a power of two >= 16.
    block_out: output features per block, a power of two >= 16 (on TPU, a
      multiple of 128 when OUT is larger than it).
    interpret: run the kernel in interpret mode; None means interpret on the
      CPU backend (Pallas cannot compile for CPU) and compile otherwise.
    backend: the kernel to build, 'gpu' (Triton), 'tpu' (Mosaic) or
      'interpret', whatever the default backend: a program exported for
      another platform names it (see `BACKENDS`). None: from `interpret` and
      the default backend.

  Returns:
    (B, P, OUT) in out_dtype.

  The product's inputs are in x.dtype (bfloat16 stays bfloat16 for the tensor
  cores / MXU) with float32 accumulation; the demodulation, noise, bias and
  activation are applied to the float32 accumulator in the kernel, and the
  result is written once in out_dtype.

  Shapes that the blocks do not divide: the block is first shrunk to the
  largest power of two (>= 16) that divides the axis; only when there is none
  are the arrays padded in this wrapper and the result sliced (on the pixel
  axis that copies x once, so callers that care should pass P with a factor
  of 16 or block_pixels, as H * W grids have). Padding the output axis only
  pads the small per-layer arrays (kernel, inv_norm, bias) plus a slice of the
  result (e.g. ToRGB's 3 outputs are computed as 16).

  Differentiable: jax.grad works through a custom VJP whose backward pass is
  the VJP of `styled_dense_reference` (plain jnp, recomputed).
  """
  _check_arguments(x, kernel, scale, inv_norm, bias, noise, noise_strength)
  _check_activation(activation)
  for name, value in (('block_pixels', block_pixels), ('block_out', block_out)):
    if value < _MIN_BLOCK or value & (value - 1):
      raise errors.InputError(
        f'{name} must be a power of two >= {_MIN_BLOCK}, got {value}'
      )
  if backend is None:
    if interpret is None:
      interpret = jax.default_backend() == 'cpu'
    backend = 'interpret' if interpret else _default_kernel_backend()
  if backend not in BACKENDS:
    raise errors.InputError(
      f'backend must be one of {BACKENDS}, got {backend!r}'
    )
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  return _fused(
    (activation, out_dtype, block_pixels, block_out, backend),
    x,
    kernel,
    scale,
    inv_norm,
    bias,
    noise,
    noise_strength,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(config, x, kernel, scale, inv_norm, bias, noise, noise_strength):
  activation, out_dtype, block_pixels, block_out, backend = config
  interpret = backend == 'interpret'
  plan = _plan(
    x.shape, kernel.shape[1], block_pixels, block_out, backend=backend
  )
  return _pallas_forward(
    plan,
    x,
    kernel,
    scale,
    inv_norm,
    bias,
    noise,
    noise_strength,
    activation=activation,
    out_dtype=out_dtype,
    interpret=interpret,
    backend=backend,
  )


def _fused_fwd(config, x, kernel, scale, inv_norm, bias, noise, noise_strength):
  y = _fused(config, x, kernel, scale, inv_norm, bias, noise, noise_strength)
  return y, (x, kernel, scale, inv_norm, bias, noise, noise_strength)


def _fused_bwd(config, residuals, cotangent):
  activation, out_dtype, _, _, _ = config
  x, kernel, scale, inv_norm, bias, noise, noise_strength = residuals

  def reference(x, kernel, scale, inv_norm, bias, noise, noise_strength):
    return styled_dense_reference(
      x,
      kernel,
      scale,
      inv_norm,
      bias,
      noise=noise,
      noise_strength=noise_strength,
      activation=activation,
      out_dtype=out_dtype,
    )

  _, vjp = jax.vjp(reference, *residuals)
  return vjp(cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)


class _Plan(NamedTuple):
  """Block sizes and padded extents of the three axes."""

  block_pixels: int
  padded_pixels: int
  block_in: int  # chunk of IN per dot inside the kernel
  padded_in: int
  block_out: int
  padded_out: int


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _plan_axis(n: int, block: int) -> tuple[int, int]:
  """(block, padded n) for an axis of n: a power of two >= 16 dividing it."""
  size = block
  while size >= _MIN_BLOCK and n % size:
    size //= 2
  if size >= _MIN_BLOCK:
    return size, n
  size = min(block, _next_power_of_two(max(n, _MIN_BLOCK)))
  return size, _round_up(n, size)


def _plan(
  x_shape: tuple[int, ...],
  out_features: int,
  block_pixels: int,
  block_out: int,
  *,
  backend: str,
) -> _Plan:
  """Legal block sizes for `backend` ('interpret', 'gpu' or 'tpu')."""
  _, pixels, in_features = x_shape
  bp, padded_pixels = _plan_axis(pixels, block_pixels)
  if backend == 'tpu':
    # Mosaic: the block's last dim is a multiple of 128 or the full dim, and
    # the whole (bp, IN) block is in VMEM, so one dot over all of IN.
    padded_in = block_in = in_features
    if out_features <= block_out:
      bo = padded_out = out_features
    elif block_out % 128:
      raise errors.InputError(
        f'on TPU block_out must be a multiple of 128, got {block_out}'
      )
    else:
      bo, padded_out = block_out, _round_up(out_features, block_out)
  else:
    # Triton: every block has a power-of-two size, so IN is padded to one when
    # it is not (a copy of x; CIPS widths are powers of two).
    if backend == 'gpu':
      padded_in = _next_power_of_two(max(in_features, _MIN_BLOCK))
    else:
      padded_in = in_features
    block_in = padded_in
    for size in (_MAX_BLOCK_IN, 32, 16):
      if padded_in % size == 0:
        block_in = size
        break
    bo, padded_out = _plan_axis(out_features, block_out)
  return _Plan(bp, padded_pixels, block_in, padded_in, bo, padded_out)


def _pallas_forward(
  plan: _Plan,
  x: Array,
  kernel: Array,
  scale: Array,
  inv_norm: Optional[Array],
  bias: Array,
  noise: Optional[Array],
  noise_strength: Optional[Array],
  *,
  activation: Optional[str],
  out_dtype: DType,
  interpret: bool,
  backend: str,
) -> Array:
  """Pads to the plan, runs the kernel and slices the result back."""
  batch, pixels, in_features = x.shape
  out_features = kernel.shape[1]
  dp = plan.padded_pixels - pixels
  di = plan.padded_in - in_features
  do = plan.padded_out - out_features
  f32 = jnp.float32
  # Zero padding: padded inputs meet zero kernel rows, padded outputs are
  # sliced away, padded pixels too.
  if dp or di:
    x = jnp.pad(x, ((0, 0), (0, dp), (0, di)))
  kernel = jnp.pad(kernel.astype(f32), ((0, di), (0, do)))
  # Scales as a column (B, IN, 1), so a chunk (bk, 1) broadcasts across the
  # kernel's output lanes without a transpose in the kernel.
  scale = jnp.pad(scale.astype(f32), ((0, 0), (0, di)))[:, :, None]
  bias = jnp.pad(bias.astype(f32), (0, do))[None, :]

  bp, bk, bo = plan.block_pixels, plan.block_in, plan.block_out
  grid = (batch, plan.padded_pixels // bp, plan.padded_out // bo)
  inputs = [x, kernel, scale, bias]
  in_specs = [
    pl.BlockSpec((None, bp, plan.padded_in), lambda b, i, j: (b, i, 0)),
    pl.BlockSpec((plan.padded_in, bo), lambda b, i, j: (0, j)),
    pl.BlockSpec((None, plan.padded_in, 1), lambda b, i, j: (b, 0, 0)),
    pl.BlockSpec((1, bo), lambda b, i, j: (0, j)),
  ]
  if inv_norm is not None:
    inputs.append(jnp.pad(inv_norm.astype(f32), ((0, 0), (0, do)))[:, None])
    in_specs.append(pl.BlockSpec((None, 1, bo), lambda b, i, j: (b, 0, j)))
  if noise is not None:
    # noise_strength * noise is (B, P): negligible next to the (B, P, OUT)
    # epilogue it feeds, and it saves a scalar operand in the kernel.
    noise_term = jnp.asarray(noise_strength, f32) * noise.astype(f32)
    inputs.append(jnp.pad(noise_term, ((0, 0), (0, dp)))[:, :, None])
    in_specs.append(pl.BlockSpec((None, bp, 1), lambda b, i, j: (b, i, 0)))

  compiler_params = None
  if backend == 'tpu':
    compiler_params = pltpu.CompilerParams(
      dimension_semantics=('parallel', 'parallel', 'parallel')
    )
  elif backend == 'gpu':
    # Naming Triton's parameters selects the Triton lowering (jax lowers a
    # GPU pallas_call to Mosaic GPU otherwise, whose TMA copies need other
    # block layouts). Triton's defaults otherwise.
    compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
  y = pl.pallas_call(
    functools.partial(
      _kernel,
      block_in=bk,
      demodulate=inv_norm is not None,
      with_noise=noise is not None,
      activation=activation,
    ),
    out_shape=jax.ShapeDtypeStruct(
      (batch, plan.padded_pixels, plan.padded_out), out_dtype
    ),
    grid=grid,
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, bp, bo), lambda b, i, j: (b, i, j)),
    interpret=interpret,
    compiler_params=compiler_params,
    # A custom call is opaque to XLA's cost model: without this it counts no
    # FLOPs (and schedules the kernel as free) on TPUs and GPUs.
    cost_estimate=pl.CostEstimate(
      flops=2 * batch * plan.padded_pixels * plan.padded_in * plan.padded_out,
      transcendentals=0,
      bytes_accessed=sum(a.size * a.dtype.itemsize for a in inputs)
      + batch * plan.padded_pixels * plan.padded_out * out_dtype.itemsize,
    ),
    name='fused_styled_dense',
  )(*inputs)
  if dp or do:
    y = y[:, :pixels, :out_features]
  return y


def _kernel(
  x_ref,
  kernel_ref,
  scale_ref,
  bias_ref,
  *refs,
  block_in: int,
  demodulate: bool,
  with_noise: bool,
  activation: Optional[str],
):
  """One (image, pixel block, output block) of the layer.

  x_ref (bp, IN), kernel_ref (IN, bo), scale_ref (IN, 1), bias_ref (1, bo),
  then inv_norm_ref (1, bo) if demodulating, noise_ref (bp, 1) if noise, and
  o_ref (bp, bo).
  """
  refs = list(refs)
  inv_norm_ref = refs.pop(0) if demodulate else None
  noise_ref = refs.pop(0) if with_noise else None
  (o_ref,) = refs
  bp, in_features = x_ref.shape
  bo = o_ref.shape[-1]
  dtype = x_ref.dtype

  # The style scale is folded into the kernel block (scale[:, None] * kernel)
  # rather than applied to the x block. Per grid step that is IN * bo
  # multiplies instead of bp * IN, so never more work at the default bp == bo
  # and less with bigger pixel blocks; it reads x straight into the dot in its
  # own dtype (no bfloat16 -> float32 -> bfloat16 round trip over the
  # activations, which matters on chips without bfloat16 vector units); and
  # it rounds W * s once, as the reference's per-sample weight does.
  def accumulate(k, acc):
    start = k * block_in
    if not isinstance(start, int):
      # A traced loop index: tell the compiler the offset is aligned (Triton
      # cannot annotate a constant, the single-step case).
      start = pl.multiple_of(start, block_in)
    chunk = pl.ds(start, block_in)
    weight = (scale_ref[chunk, :] * kernel_ref[chunk, :]).astype(dtype)
    return acc + jnp.dot(
      x_ref[:, chunk], weight, preferred_element_type=jnp.float32
    )

  acc = jnp.zeros((bp, bo), jnp.float32)
  steps = in_features // block_in
  if steps == 1:
    acc = accumulate(0, acc)
  else:
    acc = jax.lax.fori_loop(0, steps, accumulate, acc)
  if demodulate:
    acc = acc * inv_norm_ref[...]
  if with_noise:
    acc = acc + noise_ref[...]
  acc = _activate(acc + bias_ref[...], activation)
  o_ref[...] = acc.astype(o_ref.dtype)


def _check_activation(activation: Optional[str]) -> None:
  if activation not in _ACTIVATIONS:
    raise errors.InputError(
      f"activation must be 'lrelu' or None, got {activation!r} (for "
      "layers.StyledDense's default activation None, pass 'lrelu')"
    )


def _check_arguments(x, kernel, scale, inv_norm, bias, noise, noise_strength):
  """Raises ValueError unless the shapes fit together."""
  if x.ndim != 3:
    raise errors.InputError(f'x must be (B, P, IN), got shape {x.shape}')
  batch, pixels, in_features = x.shape
  if kernel.ndim != 2 or kernel.shape[0] != in_features:
    raise errors.InputError(
      f'kernel must be (IN={in_features}, OUT), got shape {kernel.shape}'
    )
  out_features = kernel.shape[1]
  expected = {
    'scale': (scale, (batch, in_features)),
    'inv_norm': (inv_norm, (batch, out_features)),
    'bias': (bias, (out_features,)),
    'noise': (noise, (batch, pixels)),
  }
  for name, (value, shape) in expected.items():
    if value is not None and tuple(value.shape) != shape:
      raise errors.InputError(
        f'{name} must be {shape}, got shape {value.shape}'
      )
  if noise is not None and (
    noise_strength is None or jnp.ndim(noise_strength) != 0
  ):
    raise errors.InputError('noise needs a scalar noise_strength')
