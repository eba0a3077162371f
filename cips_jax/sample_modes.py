"""What each mode of `python -m cips_jax.sample` renders and writes (callable without flags).

    report = sample_modes.run('panorama', gen, variables, sample_modes.Options(width=1024),
                              'pano.png')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from cips_jax import grids, inversion, sampling, style_fields, summary
from cips_jax.metrics import seam as seam_lib
from cips_jax.metrics import spectrum as spectrum_lib


class ModeError(ValueError):
  """The mode cannot run with this generator or these inputs (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """The command's options; see `cips_jax/sample.py` for their meaning."""
  seed: int = 0
  num_images: int = 16
  truncation_psi: float = 1.0
  height: Optional[int] = None
  width: Optional[int] = None
  scale: float = 4.0
  chunk_size: int = sampling.RENDER_CHUNK
  frames: int = 24
  space: str = 'w'
  fps: float = 12.0
  num_points: Optional[int] = None   # default: a quarter of the output pixels
  fixation: tuple[float, float] = (0.0, 0.0)
  falloff: float = 1.0
  num_styles: int = 2
  softness: float = 2.0
  target: Optional[str] = None
  steps: int = 300
  perceptual_weight: float = 0.0
  real_images: Optional[str] = None
  progress: bool = True


class _Context:
  """The generator, its options and the helpers every mode shares."""

  def __init__(self, gen, variables, options: Options):
    self.gen, self.variables, self.options = gen, variables, options
    self._w_avg = None

  def size(self, default_width: Optional[int] = None) -> tuple[int, int]:
    height = self.options.height or self.gen.size
    return height, self.options.width or default_width or height

  def latents(self, count: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(self.options.seed), (count, self.gen.style_dim))

  def w_avg(self) -> Optional[jax.Array]:
    if self.options.truncation_psi == 1.0:
      return None
    if self._w_avg is None:
      self._w_avg = sampling.w_avg(self.gen, self.variables, jax.random.PRNGKey(1234))
    return self._w_avg

  def styles(self, count: int) -> jax.Array:
    w = sampling.mapping(self.gen, self.variables, self.latents(count))
    return sampling.truncate(w, self.w_avg(), self.options.truncation_psi)

  def render(self, w, coords, mix=None, label='rendering') -> np.ndarray:
    progress = summary.ProgressBar(label) if self.options.progress else None
    return sampling.render(self.gen, self.variables, w, coords, mix=mix,
                           chunk_size=self.options.chunk_size, progress=progress)


def _grid(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  images = ctx.render(ctx.styles(ctx.options.num_images), grids.uniform(height, width))
  summary.save_png(out, summary.image_grid(images))
  return {'shape': list(images.shape)}


def _superres(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  height, width = (int(round(ctx.options.scale * side)) for side in (height, width))
  image = ctx.render(ctx.styles(1), grids.scaled(height, width))[0]
  summary.save_png(out, image)
  return {'shape': list(image.shape)}


def _require_cylindrical(ctx: _Context, mode: str) -> None:
  if not ctx.gen.cylindrical:
    raise ModeError(f'--mode={mode} around a cylinder needs a generator built with '
                    'cylindrical=True (trained with experiments/panorama.py); this one is not')


def _panorama(ctx: _Context, out: str) -> dict[str, Any]:
  _require_cylindrical(ctx, 'panorama')
  height, width = ctx.size(default_width=4 * (ctx.options.height or ctx.gen.size))
  image = ctx.render(ctx.styles(1), grids.cylindrical(height, width))[0]
  summary.save_png(out, image)
  stats = seam_lib.panorama_seam(summary.to_uint8(image).astype(np.float64))
  return {'shape': list(image.shape), 'seam': stats}


def _blend(ctx: _Context, out: str) -> dict[str, Any]:
  """Two latents: the blend between the two pure renders (rows: A, blend, B)."""
  ws = ctx.styles(2)
  if ctx.gen.cylindrical:
    height, width = ctx.size(default_width=4 * (ctx.options.height or ctx.gen.size))
    coords = grids.cylindrical(height, width)
    field = style_fields.around_cylinder(height, width)
  else:
    height, width = ctx.size()
    coords = grids.uniform(height, width)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)
    field = np.broadcast_to(np.stack([1.0 - ramp, ramp], axis=-1), (height, width, 2))
  pure = ctx.render(ws, coords, label='rendering A and B')
  blended = ctx.render(ws[None], coords, mix=field[None], label='rendering the blend')[0]
  summary.save_png(out, summary.image_grid(np.stack([pure[0], blended, pure[1]]), ncols=1))
  report = {'shape': list(blended.shape)}
  if ctx.gen.cylindrical:
    report['seam'] = seam_lib.panorama_seam(summary.to_uint8(blended).astype(np.float64))
  return report


def _foveated(ctx: _Context, out: str) -> dict[str, Any]:
  """Left: the foveated samples as a Voronoi mosaic; right: the full render of the same w."""
  height, width = ctx.size()
  num_points = ctx.options.num_points or max(1, height * width // 4)
  points = grids.foveated(num_points, ctx.options.fixation, ctx.options.falloff)
  w = ctx.styles(1)
  rgb = ctx.render(w, points, label='rendering points')
  mosaic = grids.points_to_image(points, rgb[0], height, width)
  full = ctx.render(w, grids.uniform(height, width), label='rendering the full grid')[0]
  summary.save_png(out, summary.image_grid(np.stack([mosaic, full])))
  return {'shape': [height, width, 3], 'num_points': int(points.shape[0]),
          'fraction_of_full_grid': round(points.shape[0] / (height * width), 4)}


def _interpolate(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  z = ctx.latents(2)
  ws = sampling.interpolation_styles(ctx.gen, ctx.variables, z[0], z[1], ctx.options.frames,
                                     space=ctx.options.space,
                                     truncation_psi=ctx.options.truncation_psi,
                                     w_avg=ctx.w_avg())
  frames = ctx.render(ws, grids.uniform(height, width), label='rendering frames')
  summary.save_gif(out, frames, fps=ctx.options.fps)
  return {'shape': list(frames.shape)}


def _mix(ctx: _Context, out: str) -> dict[str, Any]:
  """num_styles latents in vertical bands with feathered borders (last panel: the mix)."""
  height, width = ctx.size()
  k = ctx.options.num_styles
  labels = np.broadcast_to(np.minimum(np.arange(width) * k // width, k - 1), (height, width))
  field = style_fields.from_labels(labels, k, softness=ctx.options.softness)
  ws = ctx.styles(k)
  coords = grids.uniform(height, width)
  pure = ctx.render(ws, coords, label='rendering the styles')
  mixed = ctx.render(ws[None], coords, mix=field[None], label='rendering the mix')[0]
  summary.save_png(out, summary.image_grid(np.concatenate([pure, mixed[None]]), ncols=k + 1))
  return {'shape': list(mixed.shape), 'num_styles': k}


def _read_image(path: str, height: int, width: int) -> np.ndarray:
  """An image file as uint8 (height, width, 3): shorter side resized, centre crop."""
  from PIL import Image, UnidentifiedImageError
  from cips_jax.data.builders import resize_shorter_side, to_rgb
  try:
    with Image.open(path) as image:
      image = resize_shorter_side(to_rgb(image), max(height, width))
  except (OSError, UnidentifiedImageError) as error:
    raise ModeError(f'cannot read the image {path}: {error}')
  array = np.asarray(image)
  top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
  return array[top:top + height, left:left + width]


def _invert(ctx: _Context, out: str) -> dict[str, Any]:
  """Panels: target, reconstruction from one w, reconstruction from a w per pixel."""
  height, width = ctx.size()
  target = _read_image(ctx.options.target, height, width)
  perceptual = None
  if ctx.options.perceptual_weight:
    try:
      perceptual = inversion.inception_distance()
    except FileNotFoundError as error:
      raise ModeError(f'--perceptual_weight needs the Inception weights: {error}')
  results = {space: inversion.invert(ctx.gen, ctx.variables, target, space=space,
                                     steps=ctx.options.steps, seed=ctx.options.seed,
                                     perceptual=perceptual,
                                     perceptual_weight=ctx.options.perceptual_weight)
             for space in inversion.SPACES}
  panels = [inversion.as_signed_image(target)] + [results[s].image for s in inversion.SPACES]
  summary.save_png(out, summary.image_grid(np.stack(panels)))
  return {'psnr_start': round(results['w'].psnr[0], 3),
          **{f'psnr_{space}': round(results[space].psnr[-1], 3) for space in inversion.SPACES}}


def _spectrum(ctx: _Context, out: str) -> dict[str, Any]:
  from cips_jax.data.builders import find_images
  height, width = ctx.size()
  files = find_images(ctx.options.real_images)[:ctx.options.num_images]
  if not files:
    raise ModeError(f'no image files in {ctx.options.real_images}')
  reals = np.stack([_read_image(str(f), height, width) for f in files])
  fakes = ctx.render(ctx.styles(len(reals)), grids.uniform(height, width))
  fakes = summary.to_uint8(fakes)
  spectrum_lib.plot_spectra(out, {'real': reals, 'generated': fakes})
  return {'num_images': len(reals),
          'high_frequency_log10_ratio': round(spectrum_lib.high_frequency_ratio(fakes, reals), 4)}


_MODES = {'grid': _grid, 'superres': _superres, 'panorama': _panorama, 'blend': _blend,
          'foveated': _foveated, 'interpolate': _interpolate, 'mix': _mix, 'invert': _invert,
          'spectrum': _spectrum}


def run(mode: str, gen, variables, options: Options, out: str) -> dict[str, Any]:
  """Renders `mode` with `gen` and writes `out`; returns a JSON-friendly report."""
  if mode not in _MODES:
    raise ModeError(f'unknown mode {mode!r}; expected one of {sorted(_MODES)}')
  return _MODES[mode](_Context(gen, variables, options), out)
