"""`python -m cips_jax.sample` and its library: every mode on tiny checkpoints
of every kind.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from PIL import Image
import pytest

from cips_jax import grids
from cips_jax import images
from cips_jax import loading
from cips_jax import pictures
from cips_jax import sampling
from cips_jax.data import procedural
import support
from support import REFERENCE_PT
from support import tiny_config


@pytest.fixture(scope='module')
def exported(exported_generators):
  return exported_generators


@pytest.fixture(scope='module')
def workdir(tiny_run, data_dir):
  """The shared tiny training workdir and its latest train state (step 120)."""
  path = tiny_run[0]
  step, state = support.final_state(tiny_config(data_dir), str(path))
  return str(path), step, state


def render_mode(mode, checkpoint, out, **options):
  """What `python -m cips_jax.sample` does, through its library: returns the
  JSON report.
  """
  pictures.check(mode, str(out), pictures.Options(**options))
  gen, variables = loading.open_generator(str(checkpoint))
  return pictures.run(
    mode, gen, variables, pictures.Options(**options), str(out)
  )


def test_open_generator_reads_every_kind_of_checkpoint(exported, workdir):
  path, step, state = workdir
  gen, variables = loading.open_generator(path)
  assert gen.size == 8 and gen.hidden_size == 16
  for got, want in zip(
    jax.tree_util.tree_leaves(variables['params']),
    jax.tree_util.tree_leaves(state.ema_params),
  ):
    np.testing.assert_array_equal(got, want)
  _, g_variables = loading.open_generator(path, which='g')  # the raw generator
  for got, want in zip(
    jax.tree_util.tree_leaves(g_variables['params']),
    jax.tree_util.tree_leaves(state.g_params),
  ):
    np.testing.assert_array_equal(got, want)
  assert any(
    np.any(g != e)
    for g, e in zip(
      jax.tree_util.tree_leaves(state.g_params),
      jax.tree_util.tree_leaves(state.ema_params),
    )
  )
  gen_step, _ = loading.open_generator(f'{path}/checkpoints/{step}')
  assert gen_step == gen
  gen, _ = loading.open_generator(exported[True])
  assert gen.cylindrical
  gen, variables = loading.open_generator(str(REFERENCE_PT))
  assert type(gen).__name__ == 'CIPSskip' and gen.size == 4


def test_open_generator_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    loading.open_generator(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(
    loading.NotAGeneratorError, match='not a training workdir'
  ):
    loading.open_generator(str(tmp_path / 'empty'))
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='no checkpoint yet'):
    loading.open_generator(str(tmp_path / 'run'))
  (tmp_path / 'bad.pt').write_bytes(b'not a zip file')
  with pytest.raises(loading.NotAGeneratorError, match='bad.pt'):
    loading.open_generator(str(tmp_path / 'bad.pt'))


def _image(path):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


@pytest.fixture(scope='module')
def images_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('reals')
  for seed in range(4):
    Image.fromarray(procedural.landscape(seed, 16, 16)).save(
      folder / f'{seed}.png'
    )
  return folder


MODES = {
  'grid': dict(num_images=4),
  'superres': dict(scale=3),
  'foveated': dict(height=24, fixation='0.5,-0.25', num_points=200),
  'interpolate': dict(frames=4, space='z', truncation_psi=0.7),
  'mix': dict(num_styles=3, softness=1),
  'blend': {},
}


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_mode_writes_its_file(mode, exported, tmp_path):
  out = tmp_path / ('out.gif' if mode == 'interpolate' else 'out.png')
  report = render_mode(
    mode, exported[False], out, chunk_size=300, **MODES[mode]
  )
  assert report['mode'] == mode and report['out'] == str(out)
  if mode == 'interpolate':
    with Image.open(out) as gif:
      assert gif.n_frames == 4 and gif.size == (8, 8)
    return
  image = _image(out)
  expected = {
    'grid': (19, 19, 3),
    'superres': (24, 24, 3),
    'foveated': (26, 51, 3),
    'mix': (10, 37, 3),
    'blend': (28, 10, 3),
  }[mode]
  assert image.shape == expected, mode
  assert image.std() > 0  # not a blank picture


def test_superres_is_the_generator_on_a_denser_grid(exported, tmp_path):
  out = tmp_path / 'big.png'
  render_mode('superres', exported[False], out, scale=2, seed=5)
  gen, variables = loading.open_generator(exported[False])
  z = jax.random.normal(jax.random.PRNGKey(5), (1, gen.style_dim))
  expected = images.to_uint8(
    sampling.render(
      gen, variables, sampling.mapping(gen, variables, z), grids.uniform(16, 16)
    )[0]
  )
  np.testing.assert_array_equal(_image(out), expected)


def test_panorama_and_cylinder_blend(exported, tmp_path):
  out = tmp_path / 'pano.png'
  report = render_mode('panorama', exported[True], out, width=64)
  assert _image(out).shape == (8, 64, 3)
  assert report['seam']['seam_percentile'] < 100.0
  out = tmp_path / 'blend.png'
  report = render_mode('blend', exported[True], out)
  assert _image(out).shape == (28, 34, 3)  # three 8 x 32 panoramas, one per row
  assert 'seam' in report


def test_invert_and_spectrum_modes(exported, images_folder, tmp_path):
  out = tmp_path / 'invert.png'
  report = render_mode(
    'invert',
    exported[False],
    out,
    target=str(images_folder / '0.png'),
    steps=20,
  )
  assert _image(out).shape == (19, 19, 3)
  assert (
    report['psnr_w'] > report['psnr_start']
    and report['psnr_pixel_w'] > report['psnr_w']
  )
  out = tmp_path / 'spectrum.png'
  report = render_mode(
    'spectrum', exported[False], out, real_images=str(images_folder)
  )
  assert report['num_images'] == 4 and np.isfinite(
    report['high_frequency_log10_ratio']
  )
  assert _image(out).shape == (420, 640, 3)


def test_a_workdir_and_a_reference_pt_sample(workdir, tmp_path):
  render_mode('grid', workdir[0], tmp_path / 'a.png', num_images=1)
  render_mode('grid', REFERENCE_PT, tmp_path / 'b.png', num_images=1)
  assert _image(tmp_path / 'a.png').shape == (10, 10, 3)
  assert _image(tmp_path / 'b.png').shape == (6, 6, 3)


def test_an_interpolation_as_a_png_is_a_strip_of_its_frames(exported, tmp_path):
  gif, png = tmp_path / 'walk.gif', tmp_path / 'walk.png'
  options = MODES['interpolate']
  render_mode('interpolate', exported[False], gif, **options)
  render_mode('interpolate', exported[False], png, **options)
  strip = _image(png)
  assert strip.shape == (8, 4 * 8, 3)  # the 4 frames side by side
  with Image.open(gif) as frames:
    for i in range(4):
      frames.seek(i)
      first = np.asarray(frames.convert('RGB'))
      # The same frames (GIF quantises colours: close, not equal).
      assert np.abs(strip[:, 8 * i : 8 * i + 8].astype(int) - first).mean() < 8


@pytest.mark.parametrize(
  'mode, out, options, message',
  [
    ('interpolate', 'x.jpg', {}, 'writes a .gif or a .png file'),
    ('grid', 'x.gif', {}, 'writes a .png file'),
    ('grid', 'x.png', dict(num_images=0), '--num_images=0'),
    ('foveated', 'x.png', dict(fixation='2,0'), '--fixation=2,0'),
    ('foveated', 'x.png', dict(fixation='a'), '--fixation=a'),
    ('interpolate', 'x.gif', dict(frames=1), '--frames=1'),
    ('invert', 'x.png', {}, 'needs --target'),
    ('invert', 'x.png', dict(target='/no/such.png'), 'no such file'),
    ('mix', 'x.png', dict(num_styles=1), '--num_styles=1'),
    ('invert', 'x.png', dict(perceptual_weight=-1), '--perceptual_weight=-1'),
  ],
)
def test_bad_arguments_are_named(mode, out, options, message):
  with pytest.raises(pictures.OptionError, match=message.replace('.', r'\.')):
    pictures.check(mode, out, pictures.Options(**options))


def test_bad_checkpoints_and_modes_stop_with_the_reason(exported, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    render_mode('grid', tmp_path / 'nothing', tmp_path / 'x.png')
  with pytest.raises(pictures.ModeError, match='cylindrical=True'):
    render_mode('panorama', exported[False], tmp_path / 'x.png')
  assert not (tmp_path / 'x.png').exists()


def test_the_command_line_entry_point(exported, tmp_path):
  out = tmp_path / 'grid.png'
  result = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={exported[False]}',
    '--mode=grid',
    f'--out={out}',
    '--num_images=2',
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['shape'] == [2, 8, 8, 3] and report['out'] == str(out)
  assert 'rendering [' in result.stderr  # the progress bar
  result = support.run_python(
    '-m',
    'cips_jax.sample',
    f'--checkpoint={exported[False]}',
    '--mode=panorama',
    f'--out={tmp_path / "p.png"}',
    cwd=tmp_path,
  )
  assert result.returncode == 1 and 'cylindrical=True' in result.stderr
  for flags, message in (
    (['--mode=interpolate', '--out=x.jpg'], 'writes a .gif or a .png file'),
    (
      ['--mode=grid', '--out=x.png', f'--checkpoint={tmp_path / "no"}'],
      'no checkpoint at',
    ),
  ):
    result = support.run_python(
      '-m',
      'cips_jax.sample',
      f'--checkpoint={exported[False]}',
      *flags,
      cwd=tmp_path,
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr[
      -2000:
    ]
    assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith('cips_jax.sample: error: ')
    )
    assert 'Traceback' not in result.stderr
