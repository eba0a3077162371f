"""Azimuthally averaged power spectra.

Do generated images have the frequency content of reals?

Upsampling generators leave periodic high-frequency artifacts (excess power near
the Nyquist frequency); CIPS has no upsampling, and the paper claims its spectra
follow the reals'.

    freqs, power = spectrum.power_spectrum(images)  # images (N, H, W, 3)
    # mean log10 power ratio in the top band:
    spectrum.high_frequency_ratio(fakes, reals)
    spectrum.plot_spectra('spectra.png', {'real': reals, 'CIPS': fakes})
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from cips_jax import errors
from cips_jax import images as images_lib

# ITU-R BT.601 luma weights, as PIL's 'L' conversion.
_LUMA = np.array([0.299, 0.587, 0.114])


def _grayscale(images: Any) -> np.ndarray:
  """(N, H, W, 3) uint8 or float [-1, 1] -> (N, H, W) float64 luminance.

  The luminance is in [0, 1].
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise errors.InputError(
      f'expected images (N, H, W, 3), got shape {x.shape}'
    )
  x = (
    x / 255.0
    if x.dtype == np.uint8
    else (np.clip(x.astype(np.float64), -1, 1) + 1) / 2
  )
  return x @ _LUMA


def power_spectrum(images: Any) -> tuple[np.ndarray, np.ndarray]:
  """The mean azimuthally averaged power spectrum of a batch of images.

  Each image's luminance minus its mean is Fourier transformed (orthonormal, so
  the power sums to the variance times H W); the power is averaged over rings of
  integer radius around the zero frequency, then over images. The rings run past
  the Nyquist frequency 0.5 into the corners of the spectrum (up to 0.5 sqrt 2),
  where the diagonal checkerboards of strided upsampling show.

  Returns:
    (frequencies in cycles per pixel (R,), power (R,)).
  """
  gray = _grayscale(images)
  _, height, width = gray.shape
  # Without its mean, an image's zero-frequency term would dwarf the low rings.
  gray = gray - gray.mean(axis=(1, 2), keepdims=True)
  # fftshift moves frequency 0 to (H // 2, W // 2), where fy and fx below are 0.
  power = (
    np.abs(np.fft.fftshift(np.fft.fft2(gray, norm='ortho'), axes=(1, 2))) ** 2
  )
  power = power.mean(axis=0)
  fy = (np.arange(height) - height // 2) / height
  fx = (np.arange(width) - width // 2) / width
  # Radius in units of the coarser axis' frequency step, rounded to rings.
  radius = np.hypot(*np.meshgrid(fx, fy, indexing='xy')) * min(height, width)
  rings = np.rint(radius).astype(int).ravel()
  totals = np.bincount(rings, weights=power.ravel())
  counts = np.bincount(rings)
  keep = counts > 0
  return (
    np.arange(len(counts))[keep] / min(height, width),
    totals[keep] / counts[keep],
  )


def high_frequency_ratio(
  images: Any, reference: Any, band: float = 0.25
) -> float:
  """Mean log10(power(images) / power(reference)) at high frequencies.

  The mean is over frequencies >= 0.5 (1 - band). 0 means the same
  high-frequency power; > 0 excess (e.g. upsampling artifacts), < 0 missing
  detail (blur).
  """
  freqs, power = power_spectrum(images)
  _, reference_power = power_spectrum(reference)
  top = freqs >= 0.5 * (1.0 - band)
  # 1e-20 keeps log10 finite where a flat image has no power at all.
  return float(
    np.mean(
      np.log10(power[top] + 1e-20) - np.log10(reference_power[top] + 1e-20)
    )
  )


def plot_spectra(path: str | os.PathLike, image_sets: Mapping[str, Any]) -> str:
  """Writes a PNG plot of the spectra of several image sets.

  It shows log power vs frequency.
  """
  curves = {}
  for name, images in image_sets.items():
    freqs, power = power_spectrum(images)
    curves[name] = (freqs[1:], power[1:])  # ring 0 is the (removed) mean
  return images_lib.save_line_plot(
    path,
    curves,
    x_label='frequency (cycles / pixel)',
    y_label='power',
    log_y=True,
    title='azimuthally averaged power spectrum',
  )
