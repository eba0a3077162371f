"""The sampling library: streamed rendering, grids, style fields, interpolation,
inversion.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax import grids
from cips_jax import inversion
from cips_jax import sampling
from cips_jax import style_fields
from cips_jax.data import procedural
import support
from support import tiny_generator


@pytest.fixture(scope='module')
def model():
  gen, variables = tiny_generator()
  w = sampling.mapping(
    gen, variables, jax.random.normal(jax.random.PRNGKey(1), (2, 32))
  )
  return gen, variables, np.asarray(w)


def unchunked(gen, variables, w, coords, mix=None):
  """An independent path: one jitted synthesize call over all pixels (variables
  as inputs).
  """
  render = jax.jit(
    lambda v, w, c, m: sampling.synthesize(
      gen, v, w, c, mix=m, chunk_size=10**9
    )
  )
  return np.asarray(render(variables, w, coords, mix))


# ----------------------------------------------------------------------------
# Streamed rendering.


@pytest.mark.parametrize('chunk_size', [1, 256, 333, 500, 959, 4096])
def test_chunked_render_equals_unchunked_exactly(model, chunk_size):
  gen, variables, w = model
  # 960 pixels: most chunk sizes leave a padded last chunk.
  coords = grids.uniform(24, 40)
  # (chunk_size 1 renders chunks of sampling.MIN_RENDER_CHUNK pixels)
  expected = unchunked(gen, variables, w, coords)
  got = sampling.render(gen, variables, w, coords, chunk_size=chunk_size)
  assert got.shape == (2, 24, 40, 3)
  np.testing.assert_array_equal(got, expected)


def test_chunked_per_pixel_styles_and_mixtures_equal_unchunked_exactly(model):
  gen, variables, w = model
  coords = grids.uniform(20, 20)
  rng = np.random.default_rng(0)
  per_pixel = rng.standard_normal((2, 20, 20, 32)).astype(np.float32)
  np.testing.assert_array_equal(
    sampling.render(gen, variables, per_pixel, coords, chunk_size=256),
    unchunked(gen, variables, per_pixel, coords),
  )
  mix = rng.dirichlet(np.ones(3), size=(2, 20, 20)).astype(np.float32)
  ws = rng.standard_normal((2, 3, 32)).astype(np.float32)
  np.testing.assert_array_equal(
    sampling.render(gen, variables, ws, coords, mix=mix, chunk_size=300),
    unchunked(gen, variables, ws, coords, mix),
  )


def test_per_image_coordinates_render_in_chunks(model):
  gen, variables, w = model
  coords = np.stack([grids.uniform(20, 20), grids.scaled(20, 20, scale=0.5)])
  got = sampling.render(gen, variables, w, coords, chunk_size=256)
  np.testing.assert_array_equal(got, unchunked(gen, variables, w, coords))
  # Each image really used its own grid (alone, its pixels are half as many rows
  # of each matrix product, so rounding may differ).
  alone = unchunked(gen, variables, w[1:], coords[1])[0]
  np.testing.assert_allclose(got[1], alone, atol=1e-5)
  assert (
    np.abs(got[1] - unchunked(gen, variables, w[1:], coords[0])[0]).max() > 1e-2
  )


def test_in_graph_chunking_agrees_to_rounding(model):
  gen, variables, w = model
  coords = grids.uniform(24, 24)
  looped = jax.jit(
    lambda v: sampling.synthesize(gen, v, w, coords, chunk_size=100)
  )(variables)
  np.testing.assert_allclose(
    looped, unchunked(gen, variables, w, coords), atol=2e-5, rtol=0
  )


def test_a_point_set_gives_the_pixels_of_the_same_points_in_a_grid(model):
  gen, variables, w = model
  coords = np.asarray(grids.uniform(16, 16))
  image = sampling.render(gen, variables, w, coords)
  rows = np.array([0, 3, 3, 15, 7, 9])
  cols = np.array([0, 5, 6, 15, 2, 11])
  points = coords[rows, cols]  # (6, 2)
  np.testing.assert_array_equal(
    sampling.render(gen, variables, w, points), image[:, rows, cols]
  )


def test_per_pixel_styles_equal_to_one_w_reproduce_the_per_image_render(model):
  gen, variables, w = model
  coords = grids.uniform(16, 16)
  per_pixel = np.broadcast_to(w[:, None, None, :], (2, 16, 16, 32))
  np.testing.assert_allclose(
    sampling.render(gen, variables, per_pixel, coords),
    sampling.render(gen, variables, w, coords),
    atol=1e-5,
    rtol=0,
  )
  one_hot = np.zeros((2, 16, 16, 2), np.float32)
  one_hot[:, :, 8:, 1] = 1.0
  one_hot[:, :, :8, 0] = 1.0
  mixed = sampling.render(
    gen, variables, np.stack([w, w[::-1]], axis=1), coords, mix=one_hot
  )
  pure = sampling.render(gen, variables, w, coords)
  np.testing.assert_allclose(mixed[:, :, :8], pure[:, :, :8], atol=1e-5, rtol=0)
  np.testing.assert_allclose(
    mixed[:, :, 8:], pure[::-1, :, 8:], atol=1e-5, rtol=0
  )


def test_patches_tile_the_full_render_exactly(model):
  gen, variables, w = model
  full = sampling.render(gen, variables, w, grids.uniform(20, 30))
  tiles = [
    [
      sampling.render(gen, variables, w, grids.patch(20, 30, top, left, 10, 15))
      for left in (0, 15)
    ]
    for top in (0, 10)
  ]
  stitched = np.concatenate(
    [np.concatenate(row, axis=2) for row in tiles], axis=1
  )
  np.testing.assert_array_equal(stitched, full)


def test_render_reports_progress_and_rejects_bad_chunks(model):
  gen, variables, w = model
  calls = []
  sampling.render(
    gen,
    variables,
    w,
    grids.uniform(30, 30),
    chunk_size=256,
    progress=lambda done, total: calls.append((done, total)),
  )
  assert calls == [(256, 900), (512, 900), (768, 900), (900, 900)]
  with pytest.raises(ValueError, match='chunk_size'):
    sampling.render(gen, variables, w, grids.uniform(4, 4), chunk_size=0)


def test_pixels_shard_over_devices_with_identical_results():
  env = support.environment_with_devices(8)
  script = support.TESTS / 'scripts' / 'render_on_devices.py'
  result = support.run_python(script, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['max_abs_diff'] == {'per_image': 0.0, 'mixture': 0.0}


# ----------------------------------------------------------------------------
# Grids.


def test_scaled_grids_zoom_and_extrapolate():
  np.testing.assert_allclose(
    grids.scaled(9, 7), grids.uniform(9, 7), atol=1e-7, rtol=0
  )
  zoom = np.asarray(grids.scaled(5, 5, scale=0.25, center=(0.5, -0.5)))
  np.testing.assert_allclose(zoom[0, 0], [0.25, -0.75], atol=1e-7)
  np.testing.assert_allclose(zoom[-1, -1], [0.75, -0.25], atol=1e-7)
  wide = np.asarray(grids.scaled(4, 9, scale=(2.0, 1.0)))
  assert wide[..., 0].min() == -2.0 and wide[..., 0].max() == 2.0
  assert wide[..., 1].min() == -1.0 and wide[..., 1].max() == 1.0
  with pytest.raises(ValueError, match='scale'):
    grids.scaled(4, 4, scale=0)


def test_patch_is_a_block_of_the_full_grid():
  full = np.asarray(grids.uniform(13, 17))
  np.testing.assert_array_equal(grids.patch(13, 17, 2, 5, 6, 4), full[2:8, 5:9])
  with pytest.raises(ValueError, match='outside'):
    grids.patch(13, 17, 10, 0, 6, 4)


def test_cylindrical_grid_wraps():
  grid = np.asarray(grids.cylindrical(4, 64), np.float64)
  x = grid[0, :, 0]
  step = np.diff(x)
  np.testing.assert_allclose(step, 2.0 / 64, rtol=1e-6)
  # The column after the last is the first one, a full turn (x + 2) later.
  np.testing.assert_allclose(x[0] + 2.0 - x[-1], 2.0 / 64, rtol=1e-6)
  np.testing.assert_allclose(grid[:, 0, 1], np.linspace(-1, 1, 4), atol=1e-7)


def test_cylindrical_model_renders_first_and_last_columns_as_neighbours():
  from cips_jax.metrics import seam

  gen, variables = tiny_generator(cylindrical=True)
  w = sampling.mapping(
    gen, variables, jax.random.normal(jax.random.PRNGKey(3), (1, 32))
  )
  coords = np.asarray(grids.cylindrical(16, 96))
  image = sampling.render(gen, variables, w, coords)[0]
  # Rendering one column past the end lands on the first column again.
  one_turn_on = coords[:, :1] + np.array([2.0, 0.0], np.float32)
  np.testing.assert_allclose(
    sampling.render(gen, variables, w, one_turn_on)[0], image[:, :1], atol=1e-5
  )
  stats = seam.panorama_seam(image)
  assert stats['seam_percentile'] < 95.0, stats
  # A generator that is not periodic shows its seam: the same measure flags it.
  plain, plain_variables = tiny_generator()
  flat = sampling.render(plain, plain_variables, w, coords)[0]
  assert seam.panorama_seam(flat)['seam_ratio'] > 3 * stats['seam_ratio']


def test_foveated_points_are_densest_at_the_fixation():
  fixation = np.array([0.3, -0.2])
  points = np.asarray(grids.foveated(20000, fixation=fixation, falloff=1.0))
  assert 0 < len(points) <= 20000 and np.all(np.abs(points) <= 1.0)
  np.testing.assert_array_equal(
    points, grids.foveated(20000, fixation=fixation, falloff=1.0)
  )
  r = np.linalg.norm(points - fixation, axis=-1)
  near = np.sum(r < 0.1) / (np.pi * 0.1**2)
  far = np.sum((r > 0.5) & (r < 0.6)) / (np.pi * (0.6**2 - 0.5**2))
  # Density ~ 1 / r: the ring at r ~ 0.55 holds ~ 0.05 / 0.55 the density of the
  # inner disc.
  assert near > 5 * far
  uniform = np.asarray(grids.foveated(20000, falloff=0.0))
  r0 = np.linalg.norm(uniform, axis=-1)
  inner = np.sum(r0 < 0.3) / (np.pi * 0.3**2)
  ring = np.sum((r0 > 0.6) & (r0 < 0.9)) / (np.pi * (0.9**2 - 0.6**2))
  assert inner == pytest.approx(ring, rel=0.1)
  with pytest.raises(ValueError, match='falloff'):
    grids.foveated(100, falloff=2.0)


def test_points_to_image_takes_the_nearest_point():
  grid = np.asarray(grids.uniform(8, 8)).reshape(-1, 2)
  values = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  np.testing.assert_array_equal(
    grids.points_to_image(grid, values, 8, 8), values.reshape(8, 8, 3)
  )
  two = np.array([[-0.5, 0.0], [0.5, 0.0]], np.float32)
  image = grids.points_to_image(two, np.array([[0.0], [1.0]]), 4, 6)
  np.testing.assert_array_equal(
    image[..., 0], np.repeat([[0, 0, 0, 1, 1, 1]], 4, axis=0)
  )


# ----------------------------------------------------------------------------
# Style fields and interpolation.


def test_style_fields_from_masks():
  top = np.zeros((12, 12), bool)
  top[:6] = True
  hard = style_fields.from_masks([top, ~top])
  np.testing.assert_array_equal(hard[..., 0], top.astype(np.float32))
  soft = style_fields.from_masks([top, ~top], softness=1.5)
  np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
  assert soft[0, 0, 0] > 0.999 and soft[-1, 0, 1] > 0.999  # far from the border
  # Feathered at it.
  assert 0.3 < soft[5, 0, 0] < 0.7 or 0.3 < soft[6, 0, 0] < 0.7
  uncovered = style_fields.from_masks(np.zeros((3, 4, 4)))
  np.testing.assert_allclose(uncovered, 1.0 / 3)
  labels = np.array([[0, 1], [2, 1]])
  np.testing.assert_array_equal(
    style_fields.from_labels(labels, 3).argmax(-1), labels
  )
  with pytest.raises(ValueError, match='labels'):
    style_fields.from_labels(labels, 2)


def test_cylinder_field_is_periodic_and_turns_one_style_into_the_other():
  field = style_fields.around_cylinder(2, 200, width_fraction=0.25)
  np.testing.assert_allclose(field.sum(-1), 1.0, atol=1e-6)
  weight = field[0, :, 1]
  assert weight[0] == 0.0 and weight[100] == 1.0  # start angle and its opposite
  assert np.all(np.diff(weight[:101]) >= -1e-7)  # monotone one way round
  # And back.
  np.testing.assert_allclose(weight[1:100], weight[199:100:-1], atol=1e-6)
  steps = np.abs(np.diff(np.concatenate([weight, weight[:1]])))
  assert steps.max() < 0.07  # smooth, the wrap step included


def test_interpolation():
  a, b = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
  np.testing.assert_allclose(
    sampling.lerp(a, b, [0.0, 0.5, 1.0]), [[1, 0], [0.5, 1], [0, 2]]
  )
  path = np.asarray(sampling.slerp(a, b, jnp.linspace(0, 1, 5)))
  np.testing.assert_allclose(path[0], a, atol=1e-6)
  np.testing.assert_allclose(path[-1], b, atol=1e-6)
  np.testing.assert_allclose(
    np.linalg.norm(path, axis=-1), np.linspace(1, 2, 5), rtol=1e-5
  )
  angles = np.arctan2(path[:, 1], path[:, 0])
  np.testing.assert_allclose(angles, np.linspace(0, np.pi / 2, 5), atol=1e-5)
  # Parallel.
  np.testing.assert_allclose(
    sampling.slerp(a, 3 * a, [0.5])[0], 2 * a, rtol=1e-6
  )


def test_interpolation_styles(model):
  gen, variables, _ = model
  z = jax.random.normal(jax.random.PRNGKey(5), (2, 32))
  ends = np.asarray(sampling.mapping(gen, variables, z))
  for space in ('w', 'z'):
    ws = np.asarray(
      sampling.interpolation_styles(gen, variables, z[0], z[1], 6, space=space)
    )
    assert ws.shape == (6, 32)
    np.testing.assert_allclose(ws[[0, -1]], ends, rtol=1e-5, atol=1e-5)
  ws = np.asarray(
    sampling.interpolation_styles(gen, variables, z[0], z[1], 5, space='w')
  )
  np.testing.assert_allclose(ws[2], ends.mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='space'):
    sampling.interpolation_styles(gen, variables, z[0], z[1], 5, space='x')


# ----------------------------------------------------------------------------
# Inversion.


def test_inversion_of_a_procedural_image_per_pixel_w_beats_one_w():
  gen, variables = tiny_generator()
  target = procedural.landscape(seed=7, height=16, width=16)
  assert target.dtype == np.uint8
  results = {
    space: inversion.invert(gen, variables, target, space=space, steps=60)
    for space in inversion.SPACES
  }
  for space, result in results.items():
    assert len(result.psnr) == 61
    assert result.psnr[-1] > result.psnr[0] + 1.0, (
      space,
      result.psnr[0],
      result.psnr[-1],
    )
    # The reported PSNR is that of the returned image.
    assert inversion.psnr(
      result.image, inversion.as_signed_image(target)
    ) == pytest.approx(result.psnr[-1], abs=1e-3)
  assert results['w'].w.shape == (1, 32)
  assert results['pixel_w'].w.shape == (1, 16, 16, 32)
  assert results['pixel_w'].psnr[-1] > results['w'].psnr[-1] + 3.0


def test_psnr_by_hand():
  a = np.zeros((4, 4, 3), np.float32)
  assert inversion.psnr(a, a + 0.2) == pytest.approx(10 * np.log10(4 / 0.04))
  with pytest.raises(ValueError, match='RGB'):
    inversion.invert(*tiny_generator(), np.zeros((4, 4)), steps=1)
