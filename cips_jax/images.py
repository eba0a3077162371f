"""Images as arrays and files.

Conversion, grids, PNG and GIF files, plots, image folders.

    uint8 = images.to_uint8(samples)  # float [-1, 1] -> uint8
    images.save_png('grid.png', images.image_grid(samples))
    images.save_gif('walk.gif', frames, fps=12)
    big = images.zoom(images.image_grid(samples), 4)  # nearest neighbour
    files = images.find_images('photos/')  # sorted JPEG/PNG/WebP paths
    target = images.read_image('photo.jpg', 256, 256)

Everything here is numpy and pillow; nothing imports JAX.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from typing import Any, Iterator, Mapping, Optional

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import UnidentifiedImageError

from cips_jax import errors


def to_uint8(images: Any) -> np.ndarray:
  """Float images in [-1, 1] (clamped) or uint8 -> uint8 in [0, 255].

  The shape is kept.

  Floats map like torchvision's save_image(normalize=True, range=(-1, 1)):
  floor(255 * (clip(x, -1, 1) + 1) / 2 + 0.5); NaN becomes 0 (mid-grey).
  """
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  if x.dtype == np.bool_:
    return x.astype(np.uint8) * np.uint8(255)
  # A diverged render still saves (NaN as grey) instead of failing the cast.
  x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
  # + 0.5 then floor: round half up, as torchvision does, not numpy's round
  # half to even.
  x = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5 + 0.5
  return np.clip(np.floor(x), 0, 255).astype(np.uint8)


def as_rgb(x: np.ndarray) -> np.ndarray:
  """(..., H, W), (..., H, W, 1) or (..., H, W, 3) -> (..., H, W, 3)."""
  if x.shape[-1] not in (1, 3):
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def image_grid(
  images: Any, ncols: Optional[int] = None, padding: int = 1, pad_value: int = 0
) -> np.ndarray:
  """Tiles a batch of images into one uint8 picture.

  Args:
    images: (N, H, W, 3) or (N, H, W, 1) batch (or one (H, W, 3) image), float
      in [-1, 1] (values outside are clamped) or uint8.
    ncols: images per row; default ceil(sqrt(N)). Rows = ceil(N / ncols); unused
      cells stay `pad_value`.
    padding: border in pixels around and between the images.
    pad_value: uint8 value of the border.

  Returns:
    uint8 array
    (rows * (H + padding) + padding, ncols * (W + padding) + padding, 3).
  """
  x = to_uint8(images)
  if x.ndim == 3 and x.shape[-1] in (1, 3):
    x = x[None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise errors.InputError(
      f'expected images (N, H, W, 3) or (N, H, W, 1), got shape {x.shape}'
    )
  x = as_rgb(x)
  n, h, w, _ = x.shape
  if n == 0:
    raise errors.InputError('image_grid needs at least one image')
  ncols = int(ncols) if ncols else math.ceil(math.sqrt(n))
  # No more columns than images: a short batch leaves no empty column.
  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  grid = np.full(
    (nrows * (h + padding) + padding, ncols * (w + padding) + padding, 3),
    pad_value,
    np.uint8,
  )
  for i in range(n):
    r, c = divmod(i, ncols)
    top = padding + r * (h + padding)
    left = padding + c * (w + padding)
    grid[top : top + h, left : left + w] = x[i]
  return grid


def zoom(images: Any, factor: int) -> np.ndarray:
  """Enlarges pictures by repeating every pixel factor x factor times.

  Nearest neighbour, for showing small renders at a visible size.

  Args:
    images: (..., H, W, C): one picture (H, W, C) or a stack of them such as
      GIF frames (T, H, W, C), any dtype.
    factor: integer >= 1; 1 returns `images` as they are.

  Returns:
    (..., H * factor, W * factor, C), the same dtype.
  """
  x = np.asarray(images)
  factor = int(factor)
  if factor < 1:
    raise errors.InputError(f'zoom factor must be >= 1, got {factor}')
  if x.ndim < 3:
    raise errors.InputError(
      f'expected pictures (..., H, W, C), got shape {x.shape}'
    )
  if factor == 1:
    return x
  *lead, h, w, c = x.shape
  # A broadcast view reshaped once: one copy of the enlarged size, where two
  # np.repeat calls would also allocate a picture `factor` times the input.
  view = x[..., :, None, :, None, :]
  view = np.broadcast_to(view, (*lead, h, factor, w, factor, c))
  return view.reshape(*lead, h * factor, w * factor, c)


def save_png(path: str | os.PathLike, image: Any) -> str:
  """Writes an image as PNG, creating parent directories.

  Args:
    path: file to write.
    image: uint8 (H, W, 3), (H, W, 1) or (H, W); float images in [-1, 1] are
      converted as in `to_uint8`; a batch (N, H, W, C) is tiled with
      `image_grid` first.

  Returns:
    the path written, as a string.
  """
  x = np.asarray(image)
  if x.ndim == 4:
    x = image_grid(x)
  x = to_uint8(x)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
    raise errors.InputError(f'expected an image (H, W, 3), got shape {x.shape}')
  path = os.fspath(path)
  with _replaced_at_the_end(path) as temporary:
    Image.fromarray(x).save(temporary, format='PNG')
  return path


@contextlib.contextmanager
def _replaced_at_the_end(path: str) -> Iterator[str]:
  """A temporary file beside `path`, renamed to `path` once written.

  Interrupted (Ctrl-C, an error, a full disk), the temporary file is removed
  and whatever `path` held before is left as it was.
  """
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  temporary = os.path.join(
    parent, f'.{os.path.basename(path)}.{os.getpid()}.tmp'
  )
  try:
    yield temporary
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def save_gif(
  path: str | os.PathLike, frames: Any, fps: float = 12.0, loop: bool = True
) -> str:
  """Writes frames (T, H, W, 3) as an animated GIF.

  The frames are float in [-1, 1] or uint8.
  """
  x = to_uint8(frames)
  if x.ndim != 4 or x.shape[-1] != 3 or len(x) < 1:
    raise errors.InputError(
      f'expected frames (T, H, W, 3), got shape {x.shape}'
    )
  path = os.fspath(path)
  images = [Image.fromarray(frame) for frame in x]
  # The NETSCAPE loop count 0 repeats forever; without the block a GIF plays
  # once (a count of 1 would play it twice).
  looping = {'loop': 0} if loop else {}
  with _replaced_at_the_end(path) as temporary:
    images[0].save(
      temporary,
      format='GIF',
      save_all=True,
      append_images=images[1:],
      # Milliseconds per frame; GIF stores hundredths, so the rate is
      # approximate.
      duration=int(round(1000 / fps)),
      **looping,
    )
  return path


def format_tick(value: float) -> str:
  """A tick label a reader can read: 0.2, 15, 1000, 1e-5, 2.5e6.

  Plain digits from 0.001 to 9999, a mantissa and an integer power of ten
  beyond; at most 3 significant digits, no trailing zeros or '+' signs.
  """
  value = float(f'{float(value):.3g}')  # 3 significant digits
  if value == 0:
    return '0'
  if 1e-3 <= abs(value) < 1e4:
    # '.4g' keeps 1000 in plain digits ('.3g' would write 1e+03).
    return f'{value:.4g}'
  mantissa, exponent = f'{value:.2e}'.split('e')
  mantissa = mantissa.rstrip('0').rstrip('.')
  return f'{mantissa}e{int(exponent)}'


def log_ticks(log_lo: float, log_hi: float, max_ticks: int = 6) -> np.ndarray:
  """Tick values for a log axis from 10**log_lo to 10**log_hi.

  The first of these with 3 to `max_ticks` ticks in the range: whole powers of
  ten (1, 10, 100), the 1-2-5 steps (1, 2, 5, 10), every digit (1, 2, ..., 9,
  10), every tenth (1, 1.1, ..., 9.9, 10). Where a finer kind would give too
  many, the coarser one if it has two, else every k-th of them; an axis
  narrower still gets its ends and middle rounded to 3 significant digits
  (those in the range).

  Args:
    log_lo, log_hi: the axis range as base-10 logarithms, log_lo < log_hi.
    max_ticks: the most ticks wanted (>= 3).

  Returns:
    (K,) increasing tick values (not logarithms), each in the range.
  """
  # Values a rounding error outside the range still count as in it.
  slack = 1e-9 * max(1.0, abs(log_lo), abs(log_hi))

  def inside(values):
    logs = np.log10(values)
    return values[(logs >= log_lo - slack) & (logs <= log_hi + slack)]

  first, last = math.floor(log_lo - slack), math.ceil(log_hi + slack)
  coarser = np.array([])
  tenths = np.arange(10, 100) / 10
  for mantissas in ((1,), (1, 2, 5), range(1, 10), tenths):
    ticks = inside(
      np.array([m * 10.0**e for e in range(first, last + 1) for m in mantissas])
    )
    if len(ticks) > max_ticks:
      if len(coarser) >= 2:
        return coarser
      # Thinned evenly: powers of ten stay powers of ten.
      return ticks[:: math.ceil(len(ticks) / max_ticks)]
    if len(ticks) >= 3:
      return ticks
    coarser = ticks
  if len(coarser) >= 2:
    return coarser
  ends = 10.0 ** np.array([log_lo, (log_lo + log_hi) / 2, log_hi])
  return inside(np.array([float(f'{v:.3g}') for v in ends]))


PLOT_COLOURS = [
  (31, 119, 180),
  (214, 39, 40),
  (44, 160, 44),
  (148, 103, 189),
  (255, 127, 14),
]


def save_line_plot(
  path: str | os.PathLike,
  curves: Mapping[str, tuple[Any, Any]],
  x_label: str = '',
  y_label: str = '',
  log_y: bool = False,
  title: str = '',
  size: tuple[int, int] = (640, 420),
) -> str:
  """A small PNG line plot, drawn without a plotting library.

  `curves` is {name: (x (N,), y (N,))}.
  """
  if not curves:
    raise errors.InputError('save_line_plot needs at least one curve')
  prepared = {}
  for name, (x, y) in curves.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if log_y:
      # A log axis cannot show zero or negative values: they are dropped.
      keep = y > 0
      x, y = x[keep], np.log10(y[keep])
    prepared[name] = (x, y)
  xs = np.concatenate([x for x, _ in prepared.values()])
  ys = np.concatenate([y for _, y in prepared.values()])
  if not len(xs):
    raise errors.InputError(
      'nothing to plot (no positive values on a log scale?)'
    )
  x_lo, x_hi = float(xs.min()), float(xs.max()) or 1.0
  y_lo, y_hi = float(ys.min()), float(ys.max())
  # A flat curve gets a range of 2, so that to_pixel never divides by zero.
  if y_hi == y_lo:
    y_lo, y_hi = y_lo - 1, y_hi + 1
  width, height = size
  left, right, top, bottom = 70, 20, 30, 50
  image = Image.new('RGB', size, (255, 255, 255))
  draw = ImageDraw.Draw(image)

  def to_pixel(x, y):
    px = left + (x - x_lo) / max(x_hi - x_lo, 1e-12) * (width - left - right)
    py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
    return float(px), float(py)

  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  for i in range(5):  # x ticks at fifths of the range
    xv = x_lo + i / 4 * (x_hi - x_lo)
    px, _ = to_pixel(xv, y_lo)
    draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
    draw.text((px - 12, height - bottom + 6), format_tick(xv), fill=(0, 0, 0))
  # A log axis is labelled with values (0.01, 0.1, 1 or 1e-5, 2e-5, 5e-5), at
  # their logarithms; a linear one at fifths of its range.
  if log_y:
    y_ticks = [(math.log10(v), v) for v in log_ticks(y_lo, y_hi)]
  else:
    y_ticks = [(y_lo + i / 4 * (y_hi - y_lo),) * 2 for i in range(5)]
  for yv, value in y_ticks:
    _, py = to_pixel(x_lo, yv)
    draw.line([left - 4, py, left, py], fill=(0, 0, 0))
    draw.text((4, py - 6), format_tick(value), fill=(0, 0, 0))
  y_label += ' (log scale)' if log_y else ''
  draw.text((4, 12), y_label, fill=(0, 0, 0))
  # The title starts past the y label, which shares its line.
  title_x = max(left + 4, 16 + draw.textlength(y_label))
  draw.text((title_x, 8), title, fill=(0, 0, 0))
  draw.text((width // 2 - 60, height - 18), x_label, fill=(0, 0, 0))
  # The legend is right-aligned to the longest name.
  legend_x = (
    width - right - 30 - max(draw.textlength(name) for name in prepared)
  )
  for index, (name, (x, y)) in enumerate(prepared.items()):
    colour = PLOT_COLOURS[index % len(PLOT_COLOURS)]
    points = [to_pixel(a, b) for a, b in zip(x, y)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    legend_y = top + 8 + 14 * index
    draw.line(
      [legend_x, legend_y + 6, legend_x + 20, legend_y + 6],
      fill=colour,
      width=2,
    )
    draw.text((legend_x + 25, legend_y), name, fill=colour)
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format='PNG')
  return path


# Matched case-insensitively.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')


def find_images(source_dir: str | os.PathLike) -> list[pathlib.Path]:
  """All image files under `source_dir`, sorted.

  The search is recursive; extensions are case-insensitive.
  """
  source = pathlib.Path(source_dir)
  if not source.is_dir():
    raise errors.MissingInputError(f'image folder {source} does not exist')
  files = [
    p
    for p in source.rglob('*')
    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
  ]
  # Sorted by the '/'-separated path below the folder: the same order on every
  # OS and wherever the folder lives (sorted, as docs/reference.md 4.1).
  return sorted(files, key=lambda p: p.relative_to(source).as_posix())


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB version of any PIL image.

  Grayscale, palette, RGBA (alpha dropped), 16-bit and float all work.
  """
  if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
    # PIL's convert would clip 16-bit values at 255; rescale to 8 bits instead.
    arr = np.asarray(image, dtype=np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    image = Image.fromarray(
      np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
    )
  return image if image.mode == 'RGB' else image.convert('RGB')


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Bilinear resize so that the shorter side is `size`.

  As torchvision's resize(img, size).
  """
  w, h = image.size
  if min(w, h) == size:
    return image
  # int() truncates the long side, as torchvision computes it.
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return image.resize((new_w, new_h), Image.BILINEAR)


# read_image refuses larger images before decoding them: 8192 x 8192 is half a
# GB of floats in the 16-bit conversion, and far more than any target needs.
MAX_DECODED_PIXELS = 8192 * 8192


def read_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
  """An image file as uint8 (height, width, 3).

  The shorter side is resized, then the image is centre-cropped. Any mode PIL
  reads works (RGB, RGBA and LA lose their alpha, palette, grayscale, 16-bit).

  Raises:
    errors.InputError: the file cannot be read as an image, or it has more
      than MAX_DECODED_PIXELS pixels (measured before decoding); the message
      names it.
  """
  try:
    with Image.open(path) as image:
      w, h = image.size
      if w * h > MAX_DECODED_PIXELS:
        raise errors.InputError(
          f'the image {path} is {w}x{h} pixels, more than the '
          f'{MAX_DECODED_PIXELS:,} read_image decodes: downscale it first'
        )
      # PIL decodes lazily: decode while the file is open (an RGB image
      # already at the target size would otherwise be read after closing).
      image.load()
      # The shorter side goes to the larger target side: both sides then
      # cover the centre crop.
      array = np.asarray(resize_shorter_side(to_rgb(image), max(height, width)))
  except (
    OSError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
  ) as error:
    raise errors.InputError(f'cannot read the image {path}: {error}') from None
  top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
  return array[top : top + height, left : left + width]
