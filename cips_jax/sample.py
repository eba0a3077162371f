r"""The sampling command: pictures from a trained or converted generator.

    python -m cips_jax.sample --checkpoint=DIR_OR_FILE --mode=MODE \
        --out=PATH [options]

--checkpoint is a training workdir (its latest checkpoint), an exported
generator, or an official PyTorch .pt file. Modes (all deterministic given
--seed):

  grid         PNG  --num_images samples on the training grid (or
                    --height/--width)
  superres     PNG  one sample rendered at --scale times the training resolution
  panorama     PNG  a 360-degree panorama, --width columns (cylindrical models)
  blend        PNG  two latents: around the cylinder (cylindrical models) or
                    left to right
  foveated     PNG  --num_points samples densest at --fixation, shown as a
                    Voronoi mosaic
  interpolate  GIF  --frames between two latents, lerp in W or slerp in Z
                    (--space); with a .png --out, the frames side by side
  mix          PNG  spatial styles: --num_styles latents in vertical bands
                    (--softness)
  invert       PNG  project --target (an image file) into W and per-pixel W;
                    one row: the target and the two reconstructions
  spectrum     PNG  power spectra of samples vs the images in --real_images

The options are the fields of `cips_jax.pictures.Options` (--help lists them
with their help). --zoom=N enlarges every written picture N times by repeating
pixels (nearest neighbour, after rendering: the render costs the same; not the
spectrum plot). Long renders stream over pixel chunks (--chunk_size) and
inversions run their steps, each with a progress bar on stderr (--noprogress
turns them off); a JSON line with what was written ('shape' rendered,
'written_shape' in the file, e.g. the panorama's seam statistics) ends the
output.
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax

from cips_jax import cli
from cips_jax import loading
from cips_jax import pictures

_CHECKPOINT, _WHICH = cli.define_checkpoint_flags(
  'Training workdir, exported generator directory, or reference .pt file.'
)
_MODE = flags.DEFINE_enum(
  'mode', 'grid', list(pictures.MODES), 'What to render.'
)
_OUT = flags.DEFINE_string(
  'out', None, 'Output file (.png; .gif or a .png strip for interpolate).'
)
_OPTIONS = cli.define_flags_for(pictures.Options)
flags.mark_flags_as_required(['checkpoint', 'out'])


def main(argv):
  cli.no_positional_arguments(argv)
  options = cli.options_from(pictures.Options, _OPTIONS)
  pictures.check(_MODE.value, _OUT.value, options)  # before anything is loaded
  gen, variables = loading.open_generator(_CHECKPOINT.value, which=_WHICH.value)
  variables = jax.device_put(variables)
  start = time.perf_counter()
  report = pictures.run(_MODE.value, gen, variables, options, _OUT.value)
  report['seconds'] = round(time.perf_counter() - start, 3)
  print(json.dumps(report))


if __name__ == '__main__':
  cli.run(main, 'cips_jax.sample')
