"""The pictures of `python -m cips_jax.sample`, callable without flags.

One function per mode:

    options = pictures.Options(width=1024)
    # raises OptionError naming the flag:
    pictures.check('panorama', 'pano.png', options)
    report = pictures.run('panorama', gen, variables, options, 'pano.png')

`Options` is declared once: the command defines one flag per field (same name,
type, default and help), so `--width=1024` on the command line is
`Options(width=1024)` here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import jax
import numpy as np
from PIL import Image

from cips_jax import errors
from cips_jax import grids
from cips_jax import images as images_lib
from cips_jax import inversion
from cips_jax import memory_plan
from cips_jax import progress as progress_lib
from cips_jax import sampling
from cips_jax import style_fields
from cips_jax.metrics import seam as seam_lib
from cips_jax.metrics import spectrum as spectrum_lib

MODES = (
  'grid',
  'superres',
  'panorama',
  'blend',
  'foveated',
  'interpolate',
  'mix',
  'invert',
  'spectrum',
)
# --zoom's bound: a 4-pixel model at 32x is 128 pixels, already a clear view.
MAX_ZOOM = 32

# The files each mode writes; every other mode writes a .png. An interpolation
# is an animation (.gif) or its frames side by side (.png, a strip).
EXTENSIONS = {'interpolate': ('.gif', '.png')}


class ModeError(errors.InputError):
  """The mode cannot run with this generator or these inputs.

  The message says why.
  """


# An option value that cannot work; the message names it as its flag.
OptionError = errors.OptionError


# `cli.define_flags_for` builds each flag from its field: the help text and any
# `choices` are read from this metadata.
def _option(default: Any, help_text: str, **metadata) -> Any:
  return dataclasses.field(
    default=default, metadata={'help': help_text, **metadata}
  )


@dataclasses.dataclass(frozen=True)
class Options:
  """How the modes render.

  Every field is also a flag of `python -m cips_jax.sample`.
  """

  seed: int = _option(0, 'Seed of the latents.')
  num_images: int = _option(16, 'grid: number of samples.')
  truncation_psi: float = _option(1.0, 'W-space truncation (1 = none).')
  height: Optional[int] = _option(
    None, 'Output height (default: the training size).'
  )
  width: Optional[int] = _option(
    None,
    'Output width (default: the height; panorama and '
    'cylindrical blend: 4 x the height).',
  )
  scale: float = _option(4.0, 'superres: resolution factor.')
  chunk_size: int = _option(
    sampling.RENDER_CHUNK, 'Pixels per image per rendered chunk.'
  )
  frames: int = _option(24, 'interpolate: number of frames.')
  space: str = _option(
    'w', 'interpolate: lerp in W or slerp in Z.', choices=('w', 'z')
  )
  fps: float = _option(12.0, 'interpolate: frames per second.')
  num_points: Optional[int] = _option(
    None,
    'foveated: number of samples (default: a quarter of the output pixels).',
  )
  fixation: str = _option(
    '0,0', 'foveated: x,y of the densest point, in [-1, 1].'
  )
  falloff: float = _option(1.0, 'foveated: density ~ r^-falloff, in [0, 2).')
  num_styles: int = _option(2, 'mix: number of latents.')
  softness: float = _option(2.0, 'mix and blend: border blur in pixels.')
  target: Optional[str] = _option(None, 'invert: the image file to project.')
  steps: int = _option(300, 'invert: optimisation steps.')
  perceptual_weight: float = _option(
    0.0,
    'invert: weight of the Inception feature distance '
    '(needs the Inception weights).',
  )
  real_images: Optional[str] = _option(
    None, 'spectrum: a folder of real images.'
  )
  progress: bool = _option(
    True, 'Draw a progress bar on stderr while rendering and inverting.'
  )
  zoom: int = _option(
    1,
    'Enlarge every written picture by repeating each pixel zoom x zoom times '
    '(nearest neighbour, after rendering; not the spectrum plot), in '
    f'[1, {MAX_ZOOM}].',
  )

  def fixation_point(self) -> tuple[float, float]:
    """`fixation` as numbers (x, y)."""
    return tuple(float(v) for v in self.fixation.split(','))


def check(mode: str, out: str, options: Options) -> None:
  """Names every bad argument before anything is loaded.

  Raises:
    OptionError: naming the option as its flag (`--frames=1: ...`).
  """
  if mode not in MODES:
    raise OptionError(f'--mode={mode}: expected one of {", ".join(MODES)}')
  expected = EXTENSIONS.get(mode, ('.png',))
  if os.path.splitext(out)[1].lower() not in expected:
    raise OptionError(
      f'--out={out}: mode {mode} writes a {" or a ".join(expected)} file'
    )
  o = options
  for field in dataclasses.fields(Options):
    value = getattr(o, field.name)
    # NaN and infinities pass every comparison below the wrong way.
    if isinstance(value, float) and not math.isfinite(value):
      raise OptionError(f'--{field.name}={value}: must be a finite number')
  if not 0 <= o.seed < 2**32:
    raise OptionError(f'--seed={o.seed}: must be in [0, 2**32)')
  if not 0 < o.fps <= 1000:
    raise OptionError(f'--fps={o.fps}: must be in (0, 1000]')
  # A library caller may pass a float: pixels repeat a whole number of times.
  if o.zoom != int(o.zoom) or not 1 <= o.zoom <= MAX_ZOOM:
    raise OptionError(
      f'--zoom={o.zoom}: must be a whole number in [1, {MAX_ZOOM}]'
    )
  for name in (
    'num_images',
    'chunk_size',
    'steps',
    'height',
    'width',
    'num_points',
  ):
    value = getattr(o, name)
    # None (height, width, num_points) means the mode's default.
    if value is not None and value < 1:
      raise OptionError(f'--{name}={value}: must be positive')
  if o.frames < 2:
    raise OptionError(f'--frames={o.frames}: an interpolation needs at least 2')
  if o.scale <= 0:
    raise OptionError(f'--scale={o.scale}: must be positive')
  if o.num_styles < 2:
    raise OptionError(f'--num_styles={o.num_styles}: mixing needs at least 2')
  if not 0.0 <= o.falloff < 2.0:
    raise OptionError(f'--falloff={o.falloff}: must be in [0, 2)')
  if o.perceptual_weight < 0:
    raise OptionError(
      f'--perceptual_weight={o.perceptual_weight}: must be >= 0'
    )
  if o.softness < 0:
    raise OptionError(f'--softness={o.softness}: must be >= 0')
  if o.space not in ('w', 'z'):
    raise OptionError(f"--space={o.space}: must be 'w' or 'z'")
  try:
    fixation = o.fixation_point()
  except ValueError:
    # Unparsable: falls through to the same message as an out-of-range value.
    fixation = ()
  if len(fixation) != 2 or not all(abs(v) <= 1 for v in fixation):
    raise OptionError(f'--fixation={o.fixation}: expected x,y in [-1, 1]')
  if mode == 'invert' and not o.target:
    raise OptionError('--mode=invert needs --target=IMAGE_FILE')
  if mode == 'spectrum' and not o.real_images:
    raise OptionError('--mode=spectrum needs --real_images=FOLDER')
  for name in ('target', 'real_images'):
    value = getattr(o, name)
    if value and not os.path.exists(os.path.expanduser(value)):
      raise OptionError(f'--{name}={value}: no such file or folder')


# Host bytes per output pixel: the float32 render (12), its uint8 copy and the
# image encoder's (3 each), and as much again for the grids and copies between.
_BYTES_PER_OUTPUT_PIXEL = 36
# Host bytes per pixel of a --zoom'ed picture: the enlarged uint8 picture and
# the encoder's copy (3 each), and as much again for its buffers (a GIF's
# palette frames).
_BYTES_PER_ZOOMED_PIXEL = 9


def planned_output_bytes(mode: str, gen, options: Options) -> int:
  """The host memory `mode` needs for its outputs with `gen` (from sizes).

  With --zoom > 1 the enlarged written picture is counted on top: its pixels
  are zoom**2 times those rendered, the render itself unchanged.
  """
  o = options
  height = o.height or gen.size
  around = gen.cylindrical and mode == 'blend' or mode == 'panorama'
  width = o.width or (4 * height if around else height)
  images = {
    'grid': o.num_images,
    'interpolate': o.frames,
    # The pure renders, the mix, and the mixture weights (k floats a pixel).
    'mix': 2 * o.num_styles + 1,
    'blend': 4,
    # The target, two reconstructions, and a w per pixel with Adam's moments.
    'invert': 3 + 3 * gen.style_dim * 4 // _BYTES_PER_OUTPUT_PIXEL,
  }.get(mode, 1)
  if mode == 'superres':
    height, width = (int(round(o.scale * side)) for side in (height, width))
  needed = images * height * width * _BYTES_PER_OUTPUT_PIXEL
  if o.zoom > 1 and mode != 'spectrum':  # the plot is drawn at its own size
    written = {
      'grid': o.num_images,
      'interpolate': o.frames,
      'mix': o.num_styles + 1,
      'blend': 3,
      'invert': 3,
      'foveated': 2,
    }.get(mode, 1)
    needed += written * height * width * o.zoom**2 * _BYTES_PER_ZOOMED_PIXEL
  return needed


def check_output_memory(mode: str, gen, options: Options) -> None:
  """Raises OptionError when `mode`'s outputs would need more than half this
  machine's memory (planned from sizes, before anything is rendered)."""
  needed = planned_output_bytes(mode, gen, options)
  memory = memory_plan.host_memory_bytes()
  if memory is None or needed <= memory // 2:
    return
  o = options
  flags = {
    'grid': f'--num_images={o.num_images}',
    'interpolate': f'--frames={o.frames}',
    'superres': f'--scale={o.scale}',
    'mix': f'--num_styles={o.num_styles}',
  }.get(mode, f'--height={o.height} --width={o.width}')
  if o.zoom > 1:
    flags += f' --zoom={o.zoom}'
  raise OptionError(
    f'{flags}: --mode={mode} would need about '
    f'{memory_plan.describe(needed)} of memory for its output, more than half '
    f"of this machine's {memory_plan.describe(memory)}; ask for less, or "
    'render tiles with the library (sampling.render on grids.patch)'
  )


class _Context:
  """The generator, its options and the helpers every mode shares."""

  def __init__(self, gen, variables, options: Options):
    self.gen, self.variables, self.options = gen, variables, options
    self._w_avg = None
    # The shape of the picture written (after --zoom), for the report.
    self.written_shape: Optional[list[int]] = None

  def size(self, default_width: Optional[int] = None) -> tuple[int, int]:
    height = self.options.height or self.gen.size
    # --width wins, then the mode's default (panoramas), then a square.
    return height, self.options.width or default_width or height

  def latents(self, count: int) -> jax.Array:
    # From --seed alone: the same flags draw the same latents on every run.
    return jax.random.normal(
      jax.random.PRNGKey(self.options.seed), (count, self.gen.style_dim)
    )

  def w_avg(self) -> Optional[jax.Array]:
    if self.options.truncation_psi == 1.0:
      return None
    if self._w_avg is None:
      # A fixed key, not --seed: the truncation centre stays put whichever
      # latents are drawn. Estimated once, on first use.
      self._w_avg = sampling.w_avg(
        self.gen, self.variables, jax.random.PRNGKey(1234)
      )
    return self._w_avg

  def styles(self, count: int) -> jax.Array:
    w = sampling.mapping(self.gen, self.variables, self.latents(count))
    return sampling.truncate(w, self.w_avg(), self.options.truncation_psi)

  def render(self, w, coords, mix=None, label='rendering') -> np.ndarray:
    # Every mode streams through `sampling.render`: memory stays bounded by
    # --chunk_size whatever the output size.
    return sampling.render(
      self.gen,
      self.variables,
      w,
      coords,
      mix=mix,
      chunk_size=self.options.chunk_size,
      progress=self.bar(label, 'pixels'),
    )

  def bar(self, label: str, unit: str) -> Optional[progress_lib.ProgressBar]:
    """A progress(done, total) bar on stderr, or None with --noprogress."""
    return (
      progress_lib.ProgressBar(label, unit) if self.options.progress else None
    )

  def save_png(self, out: str, picture) -> None:
    """Writes picture (H, W, 3), float in [-1, 1] or uint8, zoomed."""
    # Quantised before it is enlarged: zoom**2 uint8 pixels, not float32.
    picture = images_lib.zoom(images_lib.to_uint8(picture), self.options.zoom)
    images_lib.save_png(out, picture)
    self.written_shape = list(picture.shape)

  def save_gif(self, out: str, frames) -> None:
    """Writes frames (T, H, W, 3) as a GIF, each enlarged --zoom times."""
    frames = images_lib.zoom(images_lib.to_uint8(frames), self.options.zoom)
    images_lib.save_gif(out, frames, fps=self.options.fps)
    self.written_shape = list(frames.shape)


def _grid(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  images = ctx.render(
    ctx.styles(ctx.options.num_images), grids.uniform(height, width)
  )
  ctx.save_png(out, images_lib.image_grid(images))
  return {'shape': list(images.shape)}


def _superres(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  height, width = (
    int(round(ctx.options.scale * side)) for side in (height, width)
  )
  # The same [-1, 1] square, sampled `scale` times more densely: the per-pixel
  # MLP renders any coordinates (docs/reference.md 2).
  image = ctx.render(ctx.styles(1), grids.scaled(height, width))[0]
  ctx.save_png(out, image)
  return {'shape': list(image.shape)}


def _require_cylindrical(ctx: _Context, mode: str) -> None:
  if not ctx.gen.cylindrical:
    raise ModeError(
      f'--mode={mode} around a cylinder needs a generator built with '
      'cylindrical=True (trained with experiments/panorama.py); this one is not'
    )


def _panorama(ctx: _Context, out: str) -> dict[str, Any]:
  _require_cylindrical(ctx, 'panorama')
  # 4 heights around: the aspect of the 360-degree training panoramas (a height
  # spans a quarter turn, data.procedural.TURNS_PER_HEIGHT).
  height, width = ctx.size(
    default_width=4 * (ctx.options.height or ctx.gen.size)
  )
  image = ctx.render(ctx.styles(1), grids.cylindrical(height, width))[0]
  ctx.save_png(out, image)
  # Measured on the 8-bit pixels the PNG holds, not on the float render.
  stats = seam_lib.panorama_seam(images_lib.to_uint8(image).astype(np.float64))
  return {'shape': list(image.shape), 'seam': stats}


def _blend(ctx: _Context, out: str) -> dict[str, Any]:
  """Two latents: the blend between the two pure renders (rows: A, blend, B)."""
  ws = ctx.styles(2)
  if ctx.gen.cylindrical:
    height, width = ctx.size(
      default_width=4 * (ctx.options.height or ctx.gen.size)
    )
    coords = grids.cylindrical(height, width)
    # Periodic in x, so the blended panorama still closes without a seam.
    field = style_fields.around_cylinder(height, width)
  else:
    height, width = ctx.size()
    coords = grids.uniform(height, width)
    # A across the left edge, B across the right, a linear fade in between.
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)
    field = np.broadcast_to(
      np.stack([1.0 - ramp, ramp], axis=-1), (height, width, 2)
    )
  pure = ctx.render(ws, coords, label='rendering A and B')
  # One image whose two styles mix per pixel: w (1, 2, D), mix (1, H, W, 2).
  blended = ctx.render(
    ws[None], coords, mix=field[None], label='rendering the blend'
  )[0]
  ctx.save_png(
    out, images_lib.image_grid(np.stack([pure[0], blended, pure[1]]), ncols=1)
  )
  report = {'shape': list(blended.shape)}
  if ctx.gen.cylindrical:
    report['seam'] = seam_lib.panorama_seam(
      images_lib.to_uint8(blended).astype(np.float64)
    )
  return report


def _foveated(ctx: _Context, out: str) -> dict[str, Any]:
  """The foveated samples beside the full render of the same w.

  Left: the foveated samples as a Voronoi mosaic; right: the full render.
  """
  height, width = ctx.size()
  num_points = ctx.options.num_points or max(1, height * width // 4)
  points = grids.foveated(
    num_points, ctx.options.fixation_point(), ctx.options.falloff
  )
  w = ctx.styles(1)
  # The scattered points are rendered as they are: every pixel is independent,
  # so no grid is needed (docs/reference.md 2).
  rgb = ctx.render(w, points, label='rendering points')
  mosaic = grids.points_to_image(points, rgb[0], height, width)
  full = ctx.render(
    w, grids.uniform(height, width), label='rendering the full grid'
  )[0]
  ctx.save_png(out, images_lib.image_grid(np.stack([mosaic, full])))
  return {
    'shape': [height, width, 3],
    'num_points': int(points.shape[0]),
    'fraction_of_full_grid': round(points.shape[0] / (height * width), 4),
  }


def _interpolate(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  z = ctx.latents(2)
  ws = sampling.interpolation_styles(
    ctx.gen,
    ctx.variables,
    z[0],
    z[1],
    ctx.options.frames,
    space=ctx.options.space,
    truncation_psi=ctx.options.truncation_psi,
    w_avg=ctx.w_avg(),
  )
  # The frames' styles are one batch, rendered in one streamed call.
  frames = ctx.render(
    ws, grids.uniform(height, width), label='rendering frames'
  )
  if out.lower().endswith('.png'):  # a strip: the frames in one row
    ctx.save_png(
      out, images_lib.image_grid(frames, ncols=len(frames), padding=0)
    )
  else:
    ctx.save_gif(out, frames)
  return {'shape': list(frames.shape)}


def _mix(ctx: _Context, out: str) -> dict[str, Any]:
  """num_styles latents in vertical bands with feathered borders.

  The last panel is the mix.
  """
  height, width = ctx.size()
  k = ctx.options.num_styles
  # k vertical bands of equal width (column * k // width).
  labels = np.broadcast_to(
    np.minimum(np.arange(width) * k // width, k - 1), (height, width)
  )
  field = style_fields.from_labels(labels, k, softness=ctx.options.softness)
  ws = ctx.styles(k)
  coords = grids.uniform(height, width)
  pure = ctx.render(ws, coords, label='rendering the styles')
  mixed = ctx.render(
    ws[None], coords, mix=field[None], label='rendering the mix'
  )[0]
  ctx.save_png(
    out, images_lib.image_grid(np.concatenate([pure, mixed[None]]), ncols=k + 1)
  )
  return {'shape': list(mixed.shape), 'num_styles': k}


# The progress bars' labels.
_INVERTING = {'w': 'inverting into W', 'pixel_w': 'inverting into W per pixel'}


def _invert(ctx: _Context, out: str) -> dict[str, Any]:
  """One row of panels: target, reconstruction from one w, from a w per pixel.

  In one row: the default square grid of three panels left a fourth, empty
  (black) cell.
  """
  height, width = ctx.size()
  target = images_lib.read_image(ctx.options.target, height, width)
  perceptual = None
  if ctx.options.perceptual_weight:
    try:
      perceptual = inversion.inception_distance()
    except FileNotFoundError as error:
      # Reported against the flag that asked for the weights.
      raise ModeError(
        f'--perceptual_weight needs the Inception weights: {error}'
      )
  results = {
    space: inversion.invert(
      ctx.gen,
      ctx.variables,
      target,
      space=space,
      steps=ctx.options.steps,
      seed=ctx.options.seed,
      perceptual=perceptual,
      perceptual_weight=ctx.options.perceptual_weight,
      progress=ctx.bar(_INVERTING[space], 'steps'),
    )
    for space in inversion.SPACES
  }
  panels = [inversion.as_signed_image(target)] + [
    results[s].image for s in inversion.SPACES
  ]
  ctx.save_png(out, images_lib.image_grid(np.stack(panels), ncols=len(panels)))
  # Both spaces start from the same w_avg (same seed), so either's psnr[0] is
  # the starting point.
  return {
    'shape': [height, width, 3],
    'psnr_start': round(results['w'].psnr[0], 3),
    **{
      f'psnr_{space}': round(results[space].psnr[-1], 3)
      for space in inversion.SPACES
    },
  }


def _spectrum(ctx: _Context, out: str) -> dict[str, Any]:
  height, width = ctx.size()
  files = images_lib.find_images(ctx.options.real_images)[
    : ctx.options.num_images
  ]
  if not files:
    raise ModeError(f'no image files in {ctx.options.real_images}')
  reals = np.stack([images_lib.read_image(f, height, width) for f in files])
  fakes = ctx.render(ctx.styles(len(reals)), grids.uniform(height, width))
  # Quantised like the reals, so both spectra carry the same 8-bit rounding.
  fakes = images_lib.to_uint8(fakes)
  # A plot at its own size: --zoom does not apply.
  spectrum_lib.plot_spectra(out, {'real': reals, 'generated': fakes})
  with Image.open(out) as plot:
    ctx.written_shape = [plot.height, plot.width, 3]
  return {
    'num_images': len(reals),
    'high_frequency_log10_ratio': round(
      spectrum_lib.high_frequency_ratio(fakes, reals), 4
    ),
  }


_MODES = {
  'grid': _grid,
  'superres': _superres,
  'panorama': _panorama,
  'blend': _blend,
  'foveated': _foveated,
  'interpolate': _interpolate,
  'mix': _mix,
  'invert': _invert,
  'spectrum': _spectrum,
}


def run(
  mode: str, gen, variables, options: Options, out: str
) -> dict[str, Any]:
  """Renders `mode` with `gen` and writes `out`.

  Returns:
    A JSON-friendly report: 'mode', 'out' (absolute path), 'written_shape'
    (the file's picture after --zoom: (H, W, 3), a GIF's (T, H, W, 3)), and
    the mode's own figures, such as 'shape' (what was rendered: (N, H, W, 3)
    samples or frames, or one (H, W, 3) picture or panel).
  Raises:
    OptionError: a bad option (see `check`); ModeError: the mode does not fit
      the generator.
  """
  # Checked again here: library callers may skip the command's early check.
  check(mode, out, options)
  check_output_memory(mode, gen, options)
  ctx = _Context(gen, variables, options)
  report = _MODES[mode](ctx, out)
  return {
    'mode': mode,
    'out': os.path.abspath(out),
    'written_shape': ctx.written_shape,
    **report,
  }
