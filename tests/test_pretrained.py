"""The model in the box: pretrained/noto_emoji opens by path, its samples are
emoji (closer to the Noto emoji than a freshly initialised model's, by sliced
Wasserstein distance), and the sample command renders it with no training.

tests/data/noto_emoji_32.npz holds 256 of the 3,786 training images (the Noto
Emoji, Apache License 2.0; see pretrained/noto_emoji/README.md), as prepared
at 32x32 on white.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cips_jax import grids
from cips_jax import images
from cips_jax import loading
from cips_jax import models
from cips_jax import sampling
from cips_jax.metrics import swd
import support

PRETRAINED = support.REPO / 'pretrained' / 'noto_emoji'
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
  trained = swd.sliced_wasserstein(reals, samples(gen, variables, 256), seed=0)
  fresh_variables = models.init(gen, jax.random.PRNGKey(1))
  fresh = swd.sliced_wasserstein(
    reals, samples(gen, fresh_variables, 256), seed=0
  )
  # A broken export or loader renders a fresh model's noise (or worse).
  assert trained['swd_mean'] < 0.5 * fresh['swd_mean'], (trained, fresh)
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
    'experiments/emoji.py',
    'FID',
    'KID',
    'steps',
  ):
    assert needed in card, needed
  assert (PRETRAINED / 'curve.png').is_file()
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
