"""Power spectra and panorama seam statistics against hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest

from cips_jax.metrics import seam
from cips_jax.metrics import spectrum


def gray_images(gray):
  """(N, H, W) values in [0, 1] -> (N, H, W, 3) float images in [-1, 1] with
  that luminance.
  """
  return np.repeat((2.0 * gray - 1.0)[..., None], 3, axis=-1)


def test_a_sinusoid_puts_its_power_at_its_frequency():
  size, k = 32, 5
  x = np.arange(size)
  gray = 0.5 + 0.25 * np.cos(2 * np.pi * k * x / size)[None, None, :].repeat(
    size, axis=1
  )
  freqs, power = spectrum.power_spectrum(gray_images(gray))
  assert freqs[size // 2] == 0.5 and freqs[-1] == pytest.approx(
    0.5 * np.sqrt(2), abs=0.02
  )
  assert np.argmax(power) == k
  # Orthonormal FFT: the cosine's variance 0.25^2 / 2 times H W lies in two
  # frequency bins, both at radius k; ring k has round(2 pi k)-ish members, so
  # check the ring's total.
  ring = np.rint(
    np.hypot(
      *np.meshgrid(
        np.fft.fftshift(np.fft.fftfreq(size)),
        np.fft.fftshift(np.fft.fftfreq(size)),
      )
    )
    * size
  )
  members = int(np.sum(ring == k))
  assert power[k] * members == pytest.approx(
    0.25**2 / 2 * size * size, rel=1e-6
  )


def test_white_noise_is_flat_at_its_variance():
  rng = np.random.default_rng(0)
  gray = 0.5 + 0.1 * rng.standard_normal((64, 32, 32))
  _, power = spectrum.power_spectrum(gray_images(gray))
  assert power[0] == pytest.approx(0.0, abs=1e-12)  # the mean is removed
  np.testing.assert_allclose(power[1:], 0.01, rtol=0.25)
  assert power[1:].mean() == pytest.approx(0.01, rel=0.05)


def test_high_frequency_ratio_sees_blur_and_upsampling():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
  assert spectrum.high_frequency_ratio(images, images) == 0.0
  blurred = (
    (images.astype(np.float32) + np.roll(images, 1, axis=2)) / 2
  ).astype(np.uint8)
  assert spectrum.high_frequency_ratio(blurred, images) < -0.3
  smooth = np.cumsum(
    np.cumsum(rng.standard_normal((32, 32, 32)), axis=1), axis=2
  )
  smooth = 64 + 128 * (smooth - smooth.min()) / np.ptp(smooth)
  # A faint checkerboard, the signature of strided upsampling: power at the
  # Nyquist corner.
  checker = 6.0 * (-1.0) ** (np.arange(32)[:, None] + np.arange(32)[None, :])

  def as_rgb(x):
    return np.repeat(np.round(x).astype(np.uint8)[..., None], 3, axis=-1)

  assert (
    spectrum.high_frequency_ratio(as_rgb(smooth + checker), as_rgb(smooth))
    > 0.3
  )


def test_plot_spectra_writes_a_png(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(2)
  a = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  path = spectrum.plot_spectra(
    tmp_path / 's.png', {'a': a, 'a blurred': a // 2}
  )
  with Image.open(path) as image:
    assert image.size == (640, 420)
  with pytest.raises(ValueError, match='images'):
    spectrum.power_spectrum(np.zeros((4, 4)))


def test_seam_of_a_periodic_and_of_a_cut_panorama():
  width = 200
  angle = 2 * np.pi * np.arange(width) / width
  rows = np.linspace(0, 1, 16)[:, None]
  periodic = np.stack(
    [np.sin(angle) + rows, np.cos(2 * angle) + 0 * rows, rows + 0 * angle], -1
  )
  stats = seam.panorama_seam(periodic)
  # Turning the panorama moves the wrap step inside, where it is an ordinary
  # column step.
  turned = np.roll(periodic, 50, axis=1)
  inner_step = np.abs(turned[:, 50] - turned[:, 49]).mean()
  assert stats['seam'] == pytest.approx(inner_step, rel=1e-12)
  assert (
    stats['seam'] <= stats['column_step_max']
    and stats['seam_percentile'] < 100.0
  )
  cut = periodic[:, :150]  # three quarters of the circle: its ends do not meet
  cut_stats = seam.panorama_seam(cut)
  assert cut_stats['seam_percentile'] == 100.0 and cut_stats['seam_ratio'] > 10
  with pytest.raises(ValueError, match='panorama'):
    seam.panorama_seam(np.zeros((4, 2, 3)))
