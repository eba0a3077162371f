r"""Which way of drawing samples moves the emoji card's KID: prints JSON.

The model card's FID/KID come from the evaluate command, which renders the
EMA generator with no per-pixel noise from its own seeded latents. A user who
calls `sampling.generate` may draw differently. This scores the same export,
against the same cached real statistics, with one change at a time:

- `command`: the evaluate command's renders (`Evaluator.fake_batches`);
- `noise`: the same latents, with the per-pixel noise drawn (`rng=`), as the
  generator saw it in training;
- `other_latents`: no noise, latents from another seed (the seed's spread);
- `floor_uint8`: the command's renders quantised by truncation, not rounding.

Each variant also reports the KID of its samples against 50 random draws of
as many reals as samples, one subset each (`kid_over_real_draws`): the spread
a reviewer who draws their own 1,000 reals sees.

    python benchmarks/card_kid_gap.py --data_dir=DATA --num_samples=1000 \
        --out=benchmarks/results/card_kid_gap.json

DATA holds `image_folder/noto_emoji` as the model card prepares it; the real
statistics are read from (or written to) DATA/fid_stats, the evaluate
command's cache.
"""

import json
import os
import time

from absl import app
from absl import flags
import common
import jax
import numpy as np

from cips_jax import data
from cips_jax import evaluation
from cips_jax import images as images_lib
from cips_jax import loading
from cips_jax import parallel
from cips_jax import sampling
from cips_jax.metrics import fid as fid_lib

VARIANTS = ('command', 'noise', 'other_latents', 'floor_uint8')


def _renders(gen, variables, coords, num, batch, seed, noise):
  """Float renders in [-1, 1] of N(0, I) latents, batch by batch."""
  key = jax.random.PRNGKey(seed)
  for index in range(-(-num // batch)):
    z_key, noise_key = jax.random.split(jax.random.fold_in(key, index))
    z = jax.random.normal(z_key, (batch, gen.style_dim))
    out = sampling.generate(
      gen, variables, z, coords, rng=noise_key if noise else None
    )
    yield np.asarray(out)[: min(batch, num - index * batch)]


def _floor_uint8(images):
  """uint8 by truncation: floor(255 * (clip(x) + 1) / 2)."""
  x = np.clip(np.nan_to_num(np.asarray(images, np.float64)), -1, 1)
  return np.floor(255 * (x + 1) / 2).astype(np.uint8)


def _scores(evaluator, batches, num):
  running = fid_lib.RunningStatistics(evaluation.FEATURE_DIM)
  kept = []
  for batch in batches:
    features = np.asarray(evaluator.extractor(batch))
    running.update(features)
    kept.append(features.astype(np.float32))
  fake_features = np.concatenate(kept)[: evaluation.KID_FEATURES]
  scores = evaluation.scores(
    evaluator.real,
    evaluator.real_features,
    running.result(),
    fake_features,
    seed=evaluator.seed,
  )
  scores['kid_over_real_draws'] = _kid_over_real_draws(
    evaluator.real_features, fake_features
  )
  return scores


def _kid_over_real_draws(real_features, fake_features, draws: int = 50):
  """KID of all fakes against `draws` random sets of as many reals.

  The spread a scorer sees who draws their own reals, as a review with 1,000
  against 1,000 does: one subset each, so the estimator's own std is 0.
  """
  rng = np.random.default_rng(1)
  count = min(len(fake_features), len(real_features))
  kids = [
    fid_lib.kernel_inception_distance(
      real_features[rng.choice(len(real_features), count, replace=False)],
      fake_features[:count],
      num_subsets=1,
      subset_size=count,
    )[0]
    for _ in range(draws)
  ]
  return {
    'draws': draws,
    'mean': float(np.mean(kids)),
    'std': float(np.std(kids)),
    'min': float(np.min(kids)),
    'max': float(np.max(kids)),
  }


_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', 'pretrained/noto_emoji', 'The export.'
)
_DATA = flags.DEFINE_string('data', 'image_folder/noto_emoji', 'The data set.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Prepared data sets.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Per variant.')
_NUM_REAL = flags.DEFINE_integer('num_real', 3786, 'Real images.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 50, 'Images per batch.')
_VARIANTS = flags.DEFINE_multi_enum(
  'variants', list(VARIANTS), VARIANTS, 'Which ways of drawing to score.'
)
_OUT = flags.DEFINE_string('out', None, 'Also write the JSON here.')


def main(argv):
  common.check_no_arguments(argv)
  if not _DATA_DIR.value:
    raise app.UsageError('--data_dir is required')
  names = _VARIANTS.value

  gen, variables = loading.open_generator(_CHECKPOINT.value)
  data_dir = os.path.expanduser(_DATA_DIR.value)
  source = data.open_source(data_dir, _DATA.value, resolution=gen.size)
  evaluator = evaluation.evaluator_for_data(
    source,
    _DATA.value,
    gen.size,
    cylindrical=gen.cylindrical,
    cache_dir=os.path.join(data_dir, 'fid_stats'),
    num_real=_NUM_REAL.value,
    batch_size=_BATCH_SIZE.value,
    seed=0,
    mesh=parallel.make_mesh(),
    fingerprint=evaluation.data_fingerprint(source),
  )
  coords = evaluator.coords
  num, batch = _NUM_SAMPLES.value, _BATCH_SIZE.value
  results = {}
  for name in names:
    start = time.perf_counter()
    if name == 'command':
      batches = evaluator.fake_batches(gen, variables['params'], num)
    elif name == 'floor_uint8':
      batches = map(
        _floor_uint8,
        _renders(gen, variables, coords, num, batch, 10_000, False),
      )
    else:
      seed = 20_000 if name == 'other_latents' else 10_000
      batches = map(
        images_lib.to_uint8,
        _renders(gen, variables, coords, num, batch, seed, name == 'noise'),
      )
    results[name] = _scores(evaluator, batches, num)
    results[name]['seconds'] = round(time.perf_counter() - start, 1)
    print(json.dumps({name: results[name]}), flush=True)
  report = {
    'checkpoint': _CHECKPOINT.value,
    'num_samples': num,
    'num_real': _NUM_REAL.value,
    'variants': results,
  }
  report['machine'] = common.machine()
  common.print_json(report, out=_OUT.value)


if __name__ == '__main__':
  app.run(main)
