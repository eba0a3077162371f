"""One shape contract: every render call reads its inputs with `shapes.parse`.

Each wrong shape gets one message, the same from the generator's `apply`,
`sampling.synthesize`, `sampling.render` and (for coordinates and latents)
`sampling.generate`; and the layouts it reads are the documented ones.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from cips_jax import grids
from cips_jax import models
from cips_jax import sampling
from cips_jax import shapes

D = 8


@pytest.fixture(scope='module')
def tiny():
  gen = models.CIPSskip(
    size=4, hidden_size=8, style_dim=D, n_mlp=1, max_channels=8
  )
  return gen, models.init(gen, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
  'w_shape, coords_shape, mix_shape, layout',
  [
    ((2, D), (5, 6, 2), None, ((5, 6), True, shapes.PER_IMAGE, 1)),
    ((2, D), (7, 2), None, ((7,), True, shapes.PER_IMAGE, 1)),
    ((2, D), (2,), None, ((), True, shapes.PER_IMAGE, 1)),
    ((2, D), (2, 5, 6, 2), None, ((5, 6), False, shapes.PER_IMAGE, 1)),
    ((2, D), (2, 1, 7, 2), None, ((1, 7), False, shapes.PER_IMAGE, 1)),
    ((2, 5, 6, D), (5, 6, 2), None, ((5, 6), True, shapes.PER_PIXEL, 1)),
    ((2, 3, D), (5, 6, 2), (2, 5, 6, 3), ((5, 6), True, shapes.MIXTURE, 3)),
  ],
)
def test_the_documented_layouts(w_shape, coords_shape, mix_shape, layout):
  got = shapes.parse(w_shape, coords_shape, mix_shape, style_dim=D)
  pixel_shape, shared, styles, num_styles = layout
  assert got.pixel_shape == pixel_shape and got.shared_coords == shared
  assert got.styles == styles and got.num_styles == num_styles
  assert got.batch == 2 and got.output_shape() == (2, *pixel_shape, 3)


BAD = [
  # (w shape, coords shape, mix shape, the one message)
  ((2, D), (4, 4, 3), None, 'coords must end in 2'),
  ((2, D + 1), (4, 4, 2), None, f'w must end in style_dim={D}'),
  ((D,), (4, 4, 2), None, 'w must have shape (B, D) per image'),
  ((2, D), (3, 4, 4, 2), None, 'per-image coords (3, 4, 4, 2) have 3 images'),
  ((2, 4, 5, D), (4, 4, 2), None, 'a w per pixel must have shape (B, ..., D)'),
  (
    (2, 4, 4, D),
    (4, 4, 2),
    (2, 4, 4, 1),
    'with mix, w must have shape (B, K, D)',
  ),
  ((2, 3, D), (4, 4, 2), (2, 4, 4, 2), 'mix must have shape (B, ..., K)'),
]


@pytest.mark.parametrize('w_shape, coords_shape, mix_shape, message', BAD)
def test_each_wrong_shape_has_one_message_everywhere(
  tiny, w_shape, coords_shape, mix_shape, message
):
  gen, variables = tiny
  w, coords = np.zeros(w_shape, np.float32), np.zeros(coords_shape, np.float32)
  mix = None if mix_shape is None else np.zeros(mix_shape, np.float32)
  calls = {
    'parse': lambda: shapes.parse(w, coords, mix, style_dim=D),
    'apply': lambda: gen.apply(variables, w, coords, mix=mix),
    'synthesize': lambda: sampling.synthesize(
      gen, variables, w, coords, mix=mix
    ),
    'render': lambda: sampling.render(gen, variables, w, coords, mix=mix),
  }
  texts = {}
  for name, call in calls.items():
    with pytest.raises(ValueError, match=re.escape(message)) as error:
      call()
    texts[name] = str(error.value)
  assert len(set(texts.values())) == 1, texts


def test_generate_checks_latents_and_coordinates_the_same_way(tiny):
  gen, variables = tiny
  z = np.zeros((2, D), np.float32)
  with pytest.raises(
    ValueError, match=re.escape(f'z must have shape (B, {D})')
  ):
    sampling.generate(gen, variables, z[:, :3], grids.uniform(4, 4))
  with pytest.raises(ValueError) as from_generate:
    sampling.generate(gen, variables, z, np.zeros((4, 4, 3)))
  with pytest.raises(ValueError) as from_synthesize:
    sampling.synthesize(gen, variables, z, np.zeros((4, 4, 3)))
  assert str(from_generate.value) == str(from_synthesize.value)


@pytest.mark.parametrize(
  'call',
  ['generate', 'synthesize', 'synthesize_chunked', 'render', 'render_mix'],
)
def test_one_call_parses_its_inputs_once(tiny, monkeypatch, call):
  # Parsed at the public entry, then passed down: the jitted core, its chunks
  # and the generator take the Layout instead of reading the shapes again.
  gen, variables = tiny
  calls = []
  real_parse = shapes.parse

  def counting_parse(*args, **kwargs):
    calls.append(args)
    return real_parse(*args, **kwargs)

  monkeypatch.setattr(shapes, 'parse', counting_parse)
  jax.clear_caches()  # every level traces anew, so each would parse again
  key = jax.random.PRNGKey(1)
  z = jax.random.normal(key, (2, D))
  w = sampling.mapping(gen, variables, z)
  coords = np.asarray(grids.uniform(5, 7))
  per_image_coords = np.stack([coords, coords[::-1]])  # (B, 5, 7, 2)
  if call == 'generate':
    out = sampling.generate(gen, variables, z, per_image_coords)
  elif call == 'synthesize':
    out = sampling.synthesize(gen, variables, w, coords)
  elif call == 'synthesize_chunked':
    out = sampling.synthesize(gen, variables, w, per_image_coords, chunk_size=8)
  elif call == 'render':
    out = sampling.render(gen, variables, w, per_image_coords, chunk_size=16)
  else:
    ws = jax.random.normal(key, (2, 3, D))
    mix = jax.nn.softmax(jax.random.normal(key, (2, 5, 7, 3)))
    out = sampling.render(gen, variables, ws, coords, mix=mix, chunk_size=16)
  assert out.shape == (2, 5, 7, 3)
  assert len(calls) == 1, calls
