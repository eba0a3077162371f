"""Procedural "landscape" images, deterministic from an integer seed.

No download, numpy only.

A scene is a sky gradient, a sun or moon disc with a glow, 2-3 layers of
mountain ridges (hazier and lighter far away, darker near) and, in half of the
scenes, a lake that mirrors everything above it. The scene is drawn from
`np.random.default_rng(seed)` independently of the output size, so image `seed`
at 32x32 is the same scene as at 256x256.

Every horizontal structure is a function of the view angle `u` (in turns:
1.0 = 360 degrees) built from sinusoids with an integer number of cycles per
turn. `panorama` samples the whole circle, so its left and right edges meet
seamlessly; `landscape` samples a window of it (one image height spans a quarter
turn, i.e. a 90 degree vertical field of view in both).

Rendering is vectorised over pixels and edges are anti-aliased with a one-pixel
ramp, so small (32x32) versions stay clean, and cheap to make on the fly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cips_jax import errors

# One image height spans this many turns of the view angle (a quarter turn = 90
# degrees), so a panorama of height H is naturally 4H wide.
TURNS_PER_HEIGHT = 0.25

# (sky top, sky at the horizon, sun/moon colour, brightness of the ground):
# times of day.
_PALETTES = (
  ((0.20, 0.45, 0.85), (0.72, 0.86, 0.98), (1.00, 0.97, 0.85), 1.00),  # day
  ((0.28, 0.18, 0.48), (0.98, 0.58, 0.30), (1.00, 0.85, 0.45), 0.70),  # sunset
  ((0.45, 0.55, 0.88), (0.98, 0.80, 0.72), (1.00, 0.92, 0.75), 0.90),  # dawn
  (
    (0.03, 0.05, 0.18),
    (0.18, 0.26, 0.50),
    (0.92, 0.93, 0.86),
    0.45,
  ),  # night: a moon
)
# Base colours of the nearest mountains: forest, rock, slate, heather.
_GROUND = (
  (0.16, 0.32, 0.16),
  (0.38, 0.27, 0.18),
  (0.26, 0.31, 0.40),
  (0.36, 0.24, 0.36),
)
# highest ridge frequency in cycles per turn (10 per image height)
_MAX_FREQ = 40
_FREQS = np.arange(1, _MAX_FREQ + 1)


@dataclasses.dataclass(frozen=True)
class _Scene:
  """Size-independent scene parameters.

  Vertical positions are in image heights (0 = top).
  """

  sky_top: np.ndarray  # (3,) RGB in [0, 1]
  sky_horizon: np.ndarray  # (3,)
  horizon: float  # where the sky gradient ends
  disc_colour: np.ndarray  # (3,)
  disc_u: float  # angle of the sun/moon, in turns
  disc_y: float
  disc_radius: float
  ridge_mean: np.ndarray  # (L,) mean height of each ridge, far to near
  ridge_amp: np.ndarray  # (L,)
  ridge_amplitudes: np.ndarray  # (L, F) sinusoid amplitudes, F = _MAX_FREQ
  ridge_phases: np.ndarray  # (L, F)
  layer_colour: np.ndarray  # (L, 3)
  water_line: float | None  # None: no lake
  water_colour: np.ndarray  # (3,)
  ripple_phase: float
  view_u0: float  # left edge of `landscape`'s window, in turns


def _draw_scene(seed: int) -> _Scene:
  rng = np.random.default_rng(seed)
  top, horizon_colour, disc_colour, brightness = _PALETTES[
    rng.integers(len(_PALETTES))
  ]

  def jitter(c, s):
    return np.clip(np.asarray(c) + rng.uniform(-s, s, 3), 0.0, 1.0)

  sky_top, sky_horizon = jitter(top, 0.08), jitter(horizon_colour, 0.08)
  horizon = rng.uniform(0.50, 0.68)

  n_layers = int(rng.integers(2, 4))
  # Far ridges sit higher in the frame and tower more; near ones are lower and
  # flatter.
  depth = np.linspace(0.0, 1.0, n_layers)  # 0 = farthest
  ridge_mean = (
    horizon - 0.16 + 0.20 * depth + rng.uniform(-0.03, 0.03, n_layers)
  )
  ridge_amp = (0.16 - 0.07 * depth) * rng.uniform(0.7, 1.3, n_layers)
  # A 1/f^1.6 spectrum gives smooth, mountain-like profiles; near layers are
  # smoother still.
  roll_off = 1.6 + 0.6 * depth[:, None]
  ridge_amplitudes = rng.normal(size=(n_layers, _MAX_FREQ)) * _FREQS**-roll_off
  # a whole-circle tilt looks wrong in a single view
  ridge_amplitudes[:, :2] *= 0.3
  ridge_phases = rng.uniform(0.0, 2 * np.pi, (n_layers, _MAX_FREQ))

  ground = jitter(_GROUND[rng.integers(len(_GROUND))], 0.05) * brightness
  # Aerial perspective: far layers fade towards the colour of the sky at the
  # horizon.
  haze = (0.65 * (1.0 - depth))[:, None]
  layer_colour = (1 - haze) * ground + haze * (
    0.75 * sky_horizon + 0.25 * ground
  )

  has_water = rng.random() < 0.5
  water_line = (
    float(rng.uniform(max(horizon + 0.12, 0.72), 0.86)) if has_water else None
  )
  water_colour = jitter((0.10, 0.22, 0.35), 0.05) * brightness

  return _Scene(
    sky_top=sky_top,
    sky_horizon=sky_horizon,
    horizon=horizon,
    disc_colour=jitter(disc_colour, 0.03),
    disc_u=float(rng.random()),
    disc_y=float(rng.uniform(0.10, horizon - 0.22)),
    disc_radius=float(rng.uniform(0.05, 0.10)),
    ridge_mean=ridge_mean,
    ridge_amp=ridge_amp,
    ridge_amplitudes=ridge_amplitudes,
    ridge_phases=ridge_phases,
    layer_colour=layer_colour,
    water_line=water_line,
    water_colour=water_colour,
    ripple_phase=float(rng.uniform(0, 2 * np.pi)),
    view_u0=float(rng.random()),
  )


# The profiles are normalised on this fixed circle of angles, so that the scene
# does not depend on the image size; its sinusoids are computed once.
_REF_ANGLE = 2 * np.pi * _FREQS[:, None] * (np.arange(512) / 512)[None, :]
_REF_BASIS = (np.sin(_REF_ANGLE), np.cos(_REF_ANGLE))


def _profiles(
  scene: _Scene, u: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
  """Raw ridge profiles (L, W) and their smoothed slopes at angles u (W,).

  The angles u are in turns. u=None evaluates them on the reference circle. Both
  are periodic in u with period 1.
  """
  if u is None:
    sin_a, cos_a = _REF_BASIS
  else:
    angle = 2 * np.pi * _FREQS[:, None] * u[None, :]  # (F, W)
    sin_a, cos_a = np.sin(angle), np.cos(angle)
  # Sin(x + p) expanded.
  a_cos = scene.ridge_amplitudes * np.cos(scene.ridge_phases)
  a_sin = scene.ridge_amplitudes * np.sin(scene.ridge_phases)
  profile = a_cos @ sin_a + a_sin @ cos_a
  # Shading follows the slope of the broad shape only: fine ridges would shade
  # as streaks.
  smooth = _FREQS * np.exp(-((_FREQS / 8.0) ** 2))
  slope = (a_cos * smooth) @ cos_a - (a_sin * smooth) @ sin_a
  return profile, slope


def _ridges(scene: _Scene, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ridge heights (L, W) in image heights and a shading slope in [-1, 1]."""
  profile, slope = _profiles(scene, u)
  ref_profile, ref_slope = _profiles(scene, None)
  profile = profile / np.abs(ref_profile).max(axis=1, keepdims=True)
  slope = slope / np.abs(ref_slope).max(axis=1, keepdims=True)
  return scene.ridge_mean[:, None] - scene.ridge_amp[:, None] * profile, slope


def _render(
  scene: _Scene, u: np.ndarray, height: int, periodic: bool
) -> np.ndarray:
  """Renders the scene on columns at angles `u` (W,) and `height` rows.

  Returns float (H, W, 3).
  """
  width = u.shape[0]
  y = (np.arange(height) + 0.5) / height  # row centres in image heights
  yy = y[:, None]
  pixel = 1.0 / height  # one pixel, for anti-aliased edges

  t = np.clip(yy / scene.horizon, 0.0, 1.0)[..., None] ** 1.3
  img = np.broadcast_to(
    (1 - t) * scene.sky_top + t * scene.sky_horizon, (height, width, 3)
  )

  # Sun or moon: a disc plus a soft glow; the angular distance wraps around the
  # circle.
  du = (u[None, :] - scene.disc_u + 0.5) % 1.0 - 0.5
  dist = np.hypot(du / TURNS_PER_HEIGHT, yy - scene.disc_y)
  disc = np.clip((scene.disc_radius - dist) / pixel + 0.5, 0.0, 1.0)[..., None]
  glow = 0.35 * np.exp(-((dist / (3 * scene.disc_radius)) ** 2))[..., None]
  img = img + glow * scene.disc_colour
  img = (1 - disc) * img + disc * scene.disc_colour

  ridges, slopes = _ridges(scene, u)
  for ridge, slope, colour in zip(ridges, slopes, scene.layer_colour):
    cover = np.clip((yy - ridge[None, :]) / pixel + 0.5, 0.0, 1.0)[..., None]
    # Light from the side plus a little darkening with depth below the crest:
    # relief.
    shade = 1.0 + 0.2 * slope[None, :] - 0.35 * np.clip(yy - ridge, 0, 0.5)
    img = (1 - cover) * img + cover * (shade[..., None] * colour)

  if scene.water_line is not None:
    # The lake mirrors the rows above the water line; a few ripples shift rows
    # sideways.
    water = y > scene.water_line
    depth = np.where(water, y - scene.water_line, 0.0)
    # Each lake row reads the row mirrored about the water line (row i has its
    # centre at (i + 0.5) / height).
    src = np.clip(
      np.round((2 * scene.water_line - y) * height - 0.5).astype(int),
      0,
      height - 1,
    )
    shift = np.round(
      0.6
      * np.sin(2 * np.pi * 9 * depth / 0.2 + scene.ripple_phase)
      * depth
      / 0.1
      * width
      / 64
    ).astype(int)
    cols = np.arange(width)[None, :] + shift[:, None]
    # A panorama's ripples wrap across its seam; a landscape's clamp at edges.
    cols = cols % width if periodic else np.clip(cols, 0, width - 1)
    mirrored = img[src[:, None], cols]
    stripes = (0.9 + 0.1 * np.sin(2 * np.pi * 25 * depth + scene.ripple_phase))[
      :, None, None
    ]
    lake = stripes * (0.6 * mirrored + 0.4 * scene.water_colour)
    img = np.where(water[:, None, None], lake, img)
  return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_size(height: int, width: int) -> None:
  if height < 1 or width < 1:
    raise errors.DataError(f'image size must be positive, got {height}x{width}')


def landscape(seed: int, height: int, width: int) -> np.ndarray:
  """A landscape photograph of scene `seed`: uint8 (height, width, 3).

  The view is a window of the scene's 360 degree circle: one image height spans
  a quarter turn, so a square image covers 90 degrees; the left and right edges
  do not wrap.
  """
  _check_size(height, width)
  scene = _draw_scene(seed)
  # Column centres, scaled by the height: square pixels at any aspect ratio.
  u = scene.view_u0 + (np.arange(width) + 0.5) / height * TURNS_PER_HEIGHT
  # Keep the sun or moon in view: a landscape without one looks empty.
  fov = width / height * TURNS_PER_HEIGHT
  scene = dataclasses.replace(
    scene, disc_u=scene.view_u0 + (0.15 + 0.7 * scene.disc_u) * min(fov, 1.0)
  )
  return _to_uint8(_render(scene, u, height, periodic=False))


def panorama(seed: int, height: int, width: int) -> np.ndarray:
  """A full 360 degree cylindrical panorama of scene `seed`.

  Returns uint8 (height, width, 3). Column j looks at the angle
  2*pi*(j + 0.5)/width, so column width-1 and column 0 are neighbours and the
  image wraps seamlessly (np.roll of it is another valid panorama). The natural
  aspect is width = 4 * height; other widths stretch the scene horizontally.
  """
  _check_size(height, width)
  scene = _draw_scene(seed)
  u = (np.arange(width) + 0.5) / width
  return _to_uint8(_render(scene, u, height, periodic=True))
