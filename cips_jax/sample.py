"""The sampling command: pictures from a trained or converted generator.

    python -m cips_jax.sample --checkpoint=DIR_OR_FILE --mode=MODE --out=PATH [options]

--checkpoint is a training workdir (its latest checkpoint), an exported generator, or an
official PyTorch .pt file. Modes (all deterministic given --seed):

  grid         --num_images samples on the training grid (or --height/--width)      PNG
  superres     one sample rendered at --scale times the training resolution          PNG
  panorama     a 360-degree panorama, --width columns (cylindrical models)           PNG
  blend        two latents: around the cylinder (cylindrical models) or left to right PNG
  foveated     --num_points samples densest at --fixation, shown as a Voronoi mosaic PNG
  interpolate  --frames between two latents, lerp in W or slerp in Z (--space)       GIF
  mix          spatial styles: --num_styles latents in vertical bands (--softness)   PNG
  invert       project --target (an image file) into W and per-pixel W               PNG
  spectrum     power spectra of samples vs the images in --real_images               PNG

Long renders stream over pixel chunks (--chunk_size) with a progress bar; a JSON line with
what was written (and e.g. the panorama's seam statistics) ends the output.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from cips_jax import host_malloc

MODES = ('grid', 'superres', 'panorama', 'blend', 'foveated', 'interpolate', 'mix', 'invert',
         'spectrum')
_EXTENSIONS = {'interpolate': '.gif'}

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir, exported generator '
                                  'directory, or reference .pt file.')
_MODE = flags.DEFINE_enum('mode', 'grid', MODES, 'What to render.')
_OUT = flags.DEFINE_string('out', None, 'Output file (.png; .gif for interpolate).')
_WHICH = flags.DEFINE_enum('which', 'g_ema', ['g_ema', 'g'], 'Which generator of a checkpoint.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the latents.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 16, 'grid: number of samples.')
_TRUNCATION = flags.DEFINE_float('truncation_psi', 1.0, 'W-space truncation (1 = none).')
_HEIGHT = flags.DEFINE_integer('height', None, 'Output height (default: the training size).')
_WIDTH = flags.DEFINE_integer('width', None, 'Output width (default: the height; panorama: '
                              '4 x the height).')
_SCALE = flags.DEFINE_float('scale', 4.0, 'superres: resolution factor.')
_CHUNK = flags.DEFINE_integer('chunk_size', 65536, 'Pixels per image per rendered chunk.')
_FRAMES = flags.DEFINE_integer('frames', 24, 'interpolate: number of frames.')
_SPACE = flags.DEFINE_enum('space', 'w', ['w', 'z'], 'interpolate: lerp in W or slerp in Z.')
_FPS = flags.DEFINE_float('fps', 12.0, 'interpolate: frames per second.')
_NUM_POINTS = flags.DEFINE_integer('num_points', None, 'foveated: number of samples (default: '
                                   'a quarter of the output pixels).')
_FIXATION = flags.DEFINE_list('fixation', ['0', '0'], 'foveated: x,y of the densest point.')
_FALLOFF = flags.DEFINE_float('falloff', 1.0, 'foveated: density ~ r^-falloff, in [0, 2).')
_NUM_STYLES = flags.DEFINE_integer('num_styles', 2, 'mix: number of latents.')
_SOFTNESS = flags.DEFINE_float('softness', 2.0, 'mix/blend: border blur in pixels.')
_TARGET = flags.DEFINE_string('target', None, 'invert: the image file to project.')
_STEPS = flags.DEFINE_integer('steps', 300, 'invert: optimisation steps.')
_PERCEPTUAL = flags.DEFINE_float('perceptual_weight', 0.0, 'invert: weight of the Inception '
                                 'feature distance (needs the Inception weights).')
_REAL_IMAGES = flags.DEFINE_string('real_images', None, 'spectrum: a folder of real images.')
flags.mark_flags_as_required(['checkpoint', 'out'])


def _check_flags() -> None:
  """Names every bad argument before anything is loaded."""
  mode, out = _MODE.value, _OUT.value
  expected = _EXTENSIONS.get(mode, '.png')
  if os.path.splitext(out)[1].lower() != expected:
    raise app.UsageError(f'--out={out}: mode {mode} writes a {expected} file')
  positive = {'num_images': _NUM_IMAGES, 'chunk_size': _CHUNK, 'steps': _STEPS}
  for name, flag in positive.items():
    if flag.value < 1:
      raise app.UsageError(f'--{name}={flag.value}: must be positive')
  for name, flag in {'height': _HEIGHT, 'width': _WIDTH, 'num_points': _NUM_POINTS}.items():
    if flag.value is not None and flag.value < 1:
      raise app.UsageError(f'--{name}={flag.value}: must be positive')
  if _FRAMES.value < 2:
    raise app.UsageError(f'--frames={_FRAMES.value}: an interpolation needs at least 2')
  if _SCALE.value <= 0:
    raise app.UsageError(f'--scale={_SCALE.value}: must be positive')
  if _NUM_STYLES.value < 2:
    raise app.UsageError(f'--num_styles={_NUM_STYLES.value}: mixing needs at least 2')
  if not 0.0 <= _FALLOFF.value < 2.0:
    raise app.UsageError(f'--falloff={_FALLOFF.value}: must be in [0, 2)')
  if _PERCEPTUAL.value < 0:
    raise app.UsageError(f'--perceptual_weight={_PERCEPTUAL.value}: must be >= 0')
  if _SOFTNESS.value < 0:
    raise app.UsageError(f'--softness={_SOFTNESS.value}: must be >= 0')
  try:
    fixation = [float(v) for v in _FIXATION.value]
  except ValueError:
    fixation = []
  if len(fixation) != 2 or max(abs(v) for v in fixation) > 1:
    raise app.UsageError(f'--fixation={",".join(_FIXATION.value)}: expected x,y in [-1, 1]')
  if mode == 'invert' and not _TARGET.value:
    raise app.UsageError('--mode=invert needs --target=IMAGE_FILE')
  if mode == 'spectrum' and not _REAL_IMAGES.value:
    raise app.UsageError('--mode=spectrum needs --real_images=FOLDER')
  for name, flag in {'target': _TARGET, 'real_images': _REAL_IMAGES}.items():
    if flag.value and not os.path.exists(os.path.expanduser(flag.value)):
      raise app.UsageError(f'--{name}={flag.value}: no such file or folder')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _check_flags()
  import jax
  from cips_jax import loading
  from cips_jax import sample_modes

  try:
    gen, variables = loading.open_generator(_CHECKPOINT.value, which=_WHICH.value)
  except (FileNotFoundError, loading.NotAGeneratorError) as error:
    sys.exit(f'cips_jax.sample: --checkpoint: {error}')
  variables = jax.device_put(variables)
  options = sample_modes.Options(
      seed=_SEED.value, num_images=_NUM_IMAGES.value, truncation_psi=_TRUNCATION.value,
      height=_HEIGHT.value, width=_WIDTH.value, scale=_SCALE.value, chunk_size=_CHUNK.value,
      frames=_FRAMES.value, space=_SPACE.value, fps=_FPS.value, num_points=_NUM_POINTS.value,
      fixation=tuple(float(v) for v in _FIXATION.value), falloff=_FALLOFF.value,
      num_styles=_NUM_STYLES.value, softness=_SOFTNESS.value, target=_TARGET.value,
      steps=_STEPS.value, perceptual_weight=_PERCEPTUAL.value, real_images=_REAL_IMAGES.value)
  start = time.perf_counter()
  try:
    report = sample_modes.run(_MODE.value, gen, variables, options, _OUT.value)
  except sample_modes.ModeError as error:
    sys.exit(f'cips_jax.sample: {error}')
  report.update({'mode': _MODE.value, 'out': os.path.abspath(_OUT.value),
                 'seconds': round(time.perf_counter() - start, 3)})
  print(json.dumps(report))


if __name__ == '__main__':
  host_malloc.reuse_freed_memory()   # before JAX starts its threads
  app.run(main)
