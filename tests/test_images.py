"""images.read_image across every mode and size a user's picture may have.

The oracle: the same picture converted to RGB and resized by PIL directly (the
shorter side to the target, then a centre crop), on an image whose pixels are
known.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from cips_jax import errors
from cips_jax import images
from cips_jax.data import procedural

TARGET = 16


def _expected(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
  image = Image.fromarray(rgb)
  w, h = image.size
  side = max(height, width)
  if min(w, h) != side:
    scale = side / min(w, h)
    image = image.resize(
      (max(side, int(w * scale)), max(side, int(h * scale))), Image.BILINEAR
    )
  array = np.asarray(image)
  top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
  return array[top : top + height, left : left + width]


def _saved(tmp_path, rgb, mode, suffix='.png'):
  """(the file, its pixels as RGB) for `rgb` saved in `mode`."""
  image = Image.fromarray(rgb)
  if mode == 'RGBA':
    image = image.convert('RGBA')
    image.putalpha(128)
  elif mode == 'I;16':
    gray = np.asarray(image.convert('L')).astype(np.uint16) * 257
    image = Image.fromarray(gray)  # uint16: mode I;16
  elif mode != 'RGB':
    image = image.convert(mode)
  path = tmp_path / f'picture_{mode.replace(";", "")}{suffix}'
  image.save(path)
  with Image.open(path) as reread:
    if mode == 'I;16':  # 16-bit gray is rescaled to 8 bits, not clipped
      gray = np.asarray(reread, dtype=np.float64) * (255 / 65535)
      rgb = np.repeat(gray.round().astype(np.uint8)[..., None], 3, -1)
    else:
      rgb = np.asarray(reread.convert('RGB'))
  return path, rgb


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'L', 'P', 'I;16'])
@pytest.mark.parametrize('shape', [(16, 16), (16, 24), (40, 30), (10, 12)])
def test_every_mode_at_above_and_below_the_target(mode, shape, tmp_path):
  # (16, 16) and (16, 24): the shorter side already at the target, the case
  # that read the image after its file was closed.
  path, rgb = _saved(tmp_path, procedural.landscape(3, *shape), mode)
  got = images.read_image(path, TARGET, TARGET)
  assert got.shape == (TARGET, TARGET, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _expected(rgb, TARGET, TARGET))


def test_a_jpeg_at_the_target_size(tmp_path):
  path, rgb = _saved(tmp_path, procedural.landscape(4, 16, 16), 'RGB', '.jpg')
  np.testing.assert_array_equal(images.read_image(path, 16, 16), rgb)


def test_unreadable_and_oversized_files_are_one_named_error(tmp_path):
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  with pytest.raises(errors.InputError, match='cannot read the image .*broken'):
    images.read_image(broken, 8, 8)
  # A 16-bit PNG of 9000 x 9000 compresses to a few hundred KB but would
  # decode to gigabytes: refused from its header.
  huge = tmp_path / 'huge.png'
  Image.new('I;16', (9000, 9000)).save(huge)
  assert huge.stat().st_size < 2 << 20
  with pytest.raises(errors.InputError, match=r'huge.png is 9000x9000 pixels'):
    images.read_image(huge, 8, 8)


def test_zoom_repeats_each_pixel():
  rng = np.random.default_rng(0)
  picture = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  frames = rng.random((3, 4, 6, 3)).astype(np.float32)
  for x in (picture, frames):
    for factor in (1, 2, 5):
      expected = x.repeat(factor, axis=-3).repeat(factor, axis=-2)
      got = images.zoom(x, factor)
      assert got.dtype == x.dtype
      np.testing.assert_array_equal(got, expected)
  for factor, shape in ((0, (4, 4, 3)), (2, (4, 4))):
    with pytest.raises(errors.InputError):
      images.zoom(np.zeros(shape), factor)


@pytest.mark.parametrize(
  'value, label',
  [
    (0.0, '0'),
    (1.0, '1'),
    (0.2, '0.2'),
    (0.001, '0.001'),
    (1000.0, '1000'),
    (12345.6, '1.23e4'),
    (1e-5, '1e-5'),
    (2.5e-7, '2.5e-7'),
    (5e6, '5e6'),
    (10**-0.9, '0.126'),
    (-0.05, '-0.05'),
  ],
)
def test_tick_labels_read_as_numbers(value, label):
  assert images.format_tick(value) == label


def test_tick_labels_are_the_value_to_three_digits():
  rng = np.random.default_rng(1)
  for value in 10.0 ** rng.uniform(-12, 12, 500):
    label = images.format_tick(value)
    # No '1e-0.9': an exponent is a whole number, written without '+' or
    # leading zeros; the mantissa, if any, has at most 3 significant digits.
    mantissa, _, exponent = label.partition('e')
    assert exponent == '' or str(int(exponent)) == exponent, label
    assert len(mantissa.replace('.', '').strip('0')) <= 3, label
    assert float(label) == pytest.approx(value, rel=5e-3), label


def test_log_ticks_fall_on_round_values_in_the_range():
  rng = np.random.default_rng(2)
  for _ in range(300):
    lo = rng.uniform(-12, 4)
    hi = lo + 10 ** rng.uniform(-0.5, 1.3)  # from a third of a decade to 20
    ticks = images.log_ticks(lo, hi)
    logs = np.log10(ticks)
    assert np.all(np.diff(ticks) > 0) and 2 <= len(ticks) <= 6, (lo, hi)
    assert np.all(logs >= lo - 1e-9) and np.all(logs <= hi + 1e-9)
    # Every tick is a power of ten times 1, 2 or 5 (a digit or a tenth only
    # on axes narrower than a decade); axes over three decades use powers of
    # ten alone.
    mantissas = ticks / 10.0 ** np.floor(logs + 1e-9)
    assert np.allclose(10 * mantissas, np.round(10 * mantissas)), ticks
    allowed = {1} if hi - lo >= 3 else {1, 2, 5} if hi - lo >= 1 else None
    if allowed:
      assert np.allclose(mantissas, np.round(mantissas)), ticks
      assert set(np.round(mantissas).astype(int)) <= allowed, (lo, hi, ticks)
  # The range of a spectrum plot that read '1e-0.9' before.
  labels = [images.format_tick(v) for v in images.log_ticks(-0.9, 0.3)]
  assert labels == ['0.2', '0.5', '1']
