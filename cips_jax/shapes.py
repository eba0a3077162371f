"""The shape contract of every render call, parsed in one place.

The generator, `sampling.synthesize`, `sampling.generate` and `sampling.render`
all take styles `w` and coordinates `coords` (and optionally mixture weights
`mix`) in the same forms. The public entry that receives them calls `parse`
once and passes the `Layout` down (the generator's `layout=` argument); only a
direct `gen.apply` call parses in the generator:

Coordinates, `(..., 2)` with `[..., 0]` = x (along the width), `[..., 1]` = y:
- shared by the batch: at most 3 dimensions, `(2,)`, `(N, 2)` or `(H, W, 2)`;
- one set per image: 4 or more dimensions, `(B, ..., 2)` (a per-image point set
  of N points is `(B, 1, N, 2)`).
The pixel shape `...` is what the coordinates have besides the batch and the 2.

Styles (D = style_dim):
- per image: `w` `(B, D)`;
- per pixel: `w` `(B, ..., D)` with `...` the pixel shape;
- a per-pixel mixture of K styles: `w` `(B, K, D)` and `mix` `(B, ..., K)`.

Outputs have shape `(B, ..., 3)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from cips_jax import errors

PER_IMAGE, PER_PIXEL, MIXTURE = 'per_image', 'per_pixel', 'mixture'
# (H, W, 2) is the largest shared form, so a per-image point set is written
# (B, 1, N, 2): a (B, N, 2) would read as one shared (H, W, 2) grid.
MAX_SHARED_COORDS_DIMS = 3


def _shape_of(value: Any) -> tuple[int, ...]:
  # Arrays and ShapeDtypeStructs have .shape; a tuple is a shape already.
  shape = getattr(value, 'shape', None)
  return tuple(shape) if shape is not None else tuple(value)


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the inputs of one render call are.

  Attributes:
    batch: B, the number of images.
    pixel_shape: the shape of the pixels of one image (`...` above).
    shared_coords: whether one coordinate set serves every image.
    styles: PER_IMAGE, PER_PIXEL or MIXTURE.
    num_styles: K for a mixture, else 1.
    style_dim: D.
  """

  batch: int
  pixel_shape: tuple[int, ...]
  shared_coords: bool
  styles: str
  num_styles: int
  style_dim: int

  @property
  def num_pixels(self) -> int:
    """P, the number of pixels of one image."""
    return math.prod(self.pixel_shape)

  @property
  def styles_vary_per_pixel(self) -> bool:
    """Whether each pixel has a style of its own: a w per pixel or a mixture."""
    return self.styles != PER_IMAGE

  @property
  def pixel_axis(self) -> int:
    """The pixels' axis in flat coordinates: 0 if shared, 1 if per image."""
    return 0 if self.shared_coords else 1

  def flat_coords(self, coords):
    """coords -> (P, 2) if shared, else (B, P, 2)."""
    if self.shared_coords:
      return coords.reshape(self.num_pixels, 2)
    return coords.reshape(self.batch, self.num_pixels, 2)

  def flat_w(self, w):
    """w -> (B, D) per image, (B, P, D) per pixel, (B, K, D) for a mixture."""
    # Per-image and mixture styles have no pixel axes to flatten.
    if self.styles == PER_PIXEL:
      return w.reshape(self.batch, self.num_pixels, self.style_dim)
    return w

  def flat_mix(self, mix):
    """mix (B, ..., K) -> (B, P, K); None stays None."""
    if mix is None:
      return None
    return mix.reshape(self.batch, self.num_pixels, self.num_styles)

  def output_shape(self) -> tuple[int, ...]:
    """(B, ..., 3)."""
    return (self.batch, *self.pixel_shape, 3)

  def chunk(self, num_pixels: int) -> Layout:
    """The layout of `num_pixels` of every image's pixels, as a flat run.

    A chunk of shared coordinates is (n, 2), of per-image ones (B, n, 2); w
    per pixel (B, n, D); mix (B, n, K). Streaming renderers pass it down, so
    a (B, n, 2) chunk is never mistaken for a shared (H, W, 2) grid.
    """
    return dataclasses.replace(self, pixel_shape=(num_pixels,))


def parse(
  w: Any, coords: Any, mix: Any = None, style_dim: Optional[int] = None
) -> Layout:
  """Reads the layout of a render call from its inputs (arrays or shapes).

  Args:
    w: the styles, or their shape.
    coords: the coordinates, or their shape.
    mix: the mixture weights, their shape, or None.
    style_dim: D, checked against the last axis of `w` when given.
  Returns:
    The `Layout`.
  Raises:
    ValueError: naming the input whose shape breaks the contract, with the
      expected form.
  """
  w_shape, coords_shape = _shape_of(w), _shape_of(coords)
  mix_shape = None if mix is None else _shape_of(mix)
  if not coords_shape or coords_shape[-1] != 2:
    raise errors.ShapeError(
      'coords must end in 2 (x, y): (H, W, 2) or (N, 2) shared by the batch,'
      f' or (B, ..., 2) per image; got shape {coords_shape}'
    )
  if len(w_shape) < 2:
    raise errors.ShapeError(
      'w must have shape (B, D) per image, (B, ..., D) per pixel or (B, K, D)'
      f' with mix; got {w_shape}'
    )
  if style_dim is not None and w_shape[-1] != style_dim:
    raise errors.ShapeError(
      f'w must end in style_dim={style_dim}; got shape {w_shape}'
    )
  # w always leads with the batch; coords only when they are per image.
  batch = w_shape[0]
  # The rank decides, never the sizes, so B = H cannot confuse the two forms.
  shared = len(coords_shape) <= MAX_SHARED_COORDS_DIMS
  pixel_shape = coords_shape[:-1] if shared else coords_shape[1:-1]
  if not shared and coords_shape[0] != batch:
    raise errors.ShapeError(
      f'per-image coords {coords_shape} have {coords_shape[0]} images but w'
      f' {w_shape} has {batch}'
    )
  num_styles = 1
  # `mix` alone marks a mixture; a 3-D w without it is a w per pixel.
  if mix_shape is not None:
    if len(w_shape) != 3:
      raise errors.ShapeError(
        f'with mix, w must have shape (B, K, D); got {w_shape}'
      )
    num_styles = w_shape[1]
    expected = (batch, *pixel_shape, num_styles)
    if mix_shape != expected:
      raise errors.ShapeError(
        f'mix must have shape (B, ..., K) = {expected} for w {w_shape} and'
        f' coords {coords_shape}; got {mix_shape}'
      )
    styles = MIXTURE
  elif len(w_shape) == 2:
    styles = PER_IMAGE
  else:
    if w_shape[1:-1] != pixel_shape:
      raise errors.ShapeError(
        f'a w per pixel must have shape (B, ..., D) with ... = {pixel_shape},'
        f' the pixel shape of coords {coords_shape}; got {w_shape}'
      )
    styles = PER_PIXEL
  return Layout(
    batch=batch,
    pixel_shape=tuple(pixel_shape),
    shared_coords=shared,
    styles=styles,
    num_styles=num_styles,
    style_dim=w_shape[-1],
  )


def check_latents(z: Any, style_dim: int) -> None:
  """Raises ValueError unless z has shape (B, style_dim)."""
  shape = _shape_of(z)
  if len(shape) != 2 or shape[-1] != style_dim:
    raise errors.ShapeError(f'z must have shape (B, {style_dim}); got {shape}')
