"""The models in the box: pretrained/noto_emoji opens by path, its samples are
emoji (closer to the Noto emoji than a freshly initialised model's, by sliced
Wasserstein distance), and the sample command renders it with no training;
pretrained/panorama_cpu is cylindrical, closes its panoramas and draws the
procedural panoramas it was trained on. Both cards say how they were made.

tests/data/noto_emoji_32.npz holds 256 of the 3,786 training images (the Noto
Emoji, Apache License 2.0; see pretrained/noto_emoji/README.md), as prepared
at 32x32 on white.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from cips_jax import grids
from cips_jax import images
from cips_jax import loading
from cips_jax import models
from cips_jax import sampling
from cips_jax.data import procedural
from cips_jax.metrics import swd
import support

PRETRAINED = support.REPO / 'pretrained' / 'noto_emoji'
PANORAMA = support.REPO / 'pretrained' / 'panorama_cpu'
REALS = support.TESTS / 'data' / 'noto_emoji_32.npz'


@pytest.fixture(scope='module')
def shipped():
  return loading.open_generator(str(PRETRAINED))


def samples(gen, variables, count: int, seed: int = 0) -> np.ndarray:
  z = jax.random.normal(jax.random.PRNGKey(seed), (count, gen.style_dim))
  coords = grids.uniform(gen.size, gen.size)
  return images.to_uint8(sampling.generate(gen, variables, z, coords))


def test_the_shipped_model_draws_emoji_not_noise(shipped):
  gen, variables = shipped
  reals = np.load(REALS)['images']
  assert reals.shape == (256, 32, 32, 3) and gen.size == 32
  reals = reals[:128]  # enough: the two distances differ about 4x
  trained = swd.sliced_wasserstein(reals, samples(gen, variables, 128), seed=0)
  fresh_variables = models.init(gen, jax.random.PRNGKey(1))
  fresh = swd.sliced_wasserstein(
    reals, samples(gen, fresh_variables, 128), seed=0
  )
  # A broken export or loader renders a fresh model's noise (or worse). The
  # shipped model earns 0.27 of a fresh one's distance (132.3 against 491.4).
  assert trained['swd_mean'] < 0.35 * fresh['swd_mean'], (trained, fresh)
  # Emoji sit on white: most of every border is light, unlike noise.
  pictures = samples(gen, variables, 64, seed=3)
  border = np.concatenate(
    [pictures[:, 0], pictures[:, -1], pictures[:, :, 0], pictures[:, :, -1]],
    axis=1,
  )
  assert np.median(border) > 200


def test_the_model_card_names_data_license_recipe_and_scores():
  card = (PRETRAINED / 'README.md').read_text()
  for needed in (
    'Apache License 2.0',
    'emoji-datasource-google@16.0.0',
    'experiments/emoji_diffaug.py',
    'FID',
    'KID',
    'steps',
  ):
    assert needed in card, needed
  assert (PRETRAINED / 'curve.png').is_file()
  _names_its_software(card)
  scores = json.loads((PRETRAINED / 'scores.json').read_text())
  assert scores['fid'] > 0 and scores['num_fake'] >= 1000


def test_the_sample_command_renders_it_without_training(tmp_path):
  out = tmp_path / 'grid.png'
  result = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={PRETRAINED}',
    '--mode=grid',
    f'--out={out}',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['out'] == str(out) and report['shape'][1:] == [32, 32, 3]


def _names_its_software(card: str) -> None:
  assert re.search(r'jax and jaxlib 0\.\d+\.\d+', card), 'jax version'
  assert re.search(r'commit `[0-9a-f]{7}`', card), 'commit'
  commit = re.search(r'commit `([0-9a-f]{7})`', card)[1]
  # The commit is one of this repository's.
  found = support.subprocess.run(
    ['git', 'cat-file', '-t', commit],
    cwd=support.REPO,
    capture_output=True,
    text=True,
  )
  assert found.stdout.strip() == 'commit', (commit, found.stderr)


def test_the_shipped_panorama_model_closes_and_draws_panoramas():
  gen, variables = loading.open_generator(str(PANORAMA))
  assert gen.cylindrical and gen.size == 64
  z = jax.random.normal(jax.random.PRNGKey(0), (8, gen.style_dim))
  coords = grids.cylindrical(64, 256)
  pictures = images.to_uint8(sampling.generate(gen, variables, z, coords))
  # x = -1 and x = 1 are one place on the cylinder: the same pixels.
  edges = (
    np.stack([np.full(64, -1.0), np.linspace(-1, 1, 64)], axis=-1),
    np.stack([np.full(64, 1.0), np.linspace(-1, 1, 64)], axis=-1),
  )
  left, right = (
    sampling.generate(gen, variables, z[:4], edge) for edge in edges
  )
  np.testing.assert_allclose(left, right, atol=1e-4)

  # Closer to the procedural panoramas than a fresh model's renders, by SWD
  # over their 64x64 windows (it takes square images).
  def windows(panoramas):
    return np.concatenate(np.split(np.asarray(panoramas), 4, axis=2))

  reals = np.stack([procedural.panorama(seed, 64, 256) for seed in range(8)])
  trained = swd.sliced_wasserstein(windows(reals), windows(pictures), seed=0)
  fresh = images.to_uint8(
    sampling.generate(gen, models.init(gen, jax.random.PRNGKey(1)), z, coords)
  )
  untrained = swd.sliced_wasserstein(windows(reals), windows(fresh), seed=0)
  assert trained['swd_mean'] < 0.5 * untrained['swd_mean'], (trained, untrained)


def test_the_panorama_model_card_says_how_it_was_made():
  card = (PANORAMA / 'README.md').read_text()
  for needed in (
    'experiments/panorama_cpu.py',
    'procedural_landscapes/panorama_s64',
    'AMD EPYC',
    'steps',
  ):
    assert needed in card, needed
  _names_its_software(card)
  assert (PANORAMA / 'samples.png').is_file()
