"""`python -m cips_jax.sample` and its library: every mode on tiny checkpoints
of every kind.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from cips_jax import grids
from cips_jax import images
from cips_jax import inversion
from cips_jax import loading
from cips_jax import memory_plan
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


def test_invert_and_spectrum_modes(exported, images_folder, tmp_path, capsys):
  out = tmp_path / 'invert.png'
  report = render_mode(
    'invert',
    exported[False],
    out,
    target=str(images_folder / '0.png'),
    steps=20,
  )
  picture = _image(out)
  # One row of three 8 x 8 panels with 1-pixel borders: no empty grid cell.
  assert picture.shape == (10, 28, 3) and report['written_shape'] == [10, 28, 3]
  panels = [picture[1:9, 1 + 9 * i : 9 + 9 * i] for i in range(3)]
  # The target panel is the target as read; the reconstructions resemble it.
  target = images.read_image(images_folder / '0.png', 8, 8)
  np.testing.assert_array_equal(panels[0], target)
  for panel in panels:
    assert panel.std() > 5 and panel.mean() > 20  # neither uniform nor black
  # In order: the per-pixel reconstruction is the closer, as the report says.
  w_panel, pixel_w_panel = (
    inversion.psnr(panel / 127.5 - 1, target / 127.5 - 1)
    for panel in panels[1:]
  )
  assert pixel_w_panel > w_panel
  assert (
    report['psnr_w'] > report['psnr_start']
    and report['psnr_pixel_w'] > report['psnr_w']
  )
  # A progress bar over the steps of each inversion, finished at 20/20.
  err = capsys.readouterr().err
  for label in ('inverting into W [', 'inverting into W per pixel ['):
    assert label in err
  assert err.count('100%  20/20 steps') == 2
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
    ('grid', 'x.png', dict(zoom=0), '--zoom=0: must be a whole number in'),
    ('grid', 'x.png', dict(zoom=-2), '--zoom=-2: must be a whole'),
    ('interpolate', 'x.gif', dict(zoom=33), '--zoom=33: must be a whole'),
    ('grid', 'x.png', dict(zoom=2.5), '--zoom=2.5: must be a whole'),
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
    (['--mode=grid', '--out=x.png', '--zoom=0'], '--zoom=0: must be a whole'),
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


ZOOMED = {
  'grid': ('out.png', MODES['grid']),
  'interpolate': ('out.gif', MODES['interpolate']),
  'strip': ('out.png', MODES['interpolate']),
  'mix': ('out.png', MODES['mix']),
  'foveated': ('out.png', dict(height=12, num_points=40)),
}


def _frames(path):
  """Every frame of a picture file as RGB: (T, H, W, 3)."""
  with Image.open(path) as picture:
    frames = []
    for i in range(getattr(picture, 'n_frames', 1)):
      picture.seek(i)
      frames.append(np.asarray(picture.convert('RGB')))
  return np.stack(frames)


@pytest.mark.parametrize('case', sorted(ZOOMED))
def test_zoom_repeats_every_pixel_of_the_written_picture(
  case, exported, tmp_path
):
  name, options = ZOOMED[case]
  mode = 'interpolate' if case == 'strip' else case
  reports = {
    zoom: render_mode(
      mode, exported[False], tmp_path / f'{zoom}{name}', zoom=zoom, **options
    )
    for zoom in (1, 3)
  }
  small, big = (_frames(tmp_path / f'{zoom}{name}') for zoom in (1, 3))
  # Nearest neighbour: every pixel of the zoom=1 file as a 3 x 3 block,
  # borders included (a GIF's palette too: its colour counts all scale by 9).
  np.testing.assert_array_equal(big, small.repeat(3, axis=1).repeat(3, axis=2))
  # The same render; the report gives the file's size.
  assert reports[3]['shape'] == reports[1]['shape']
  for zoom, frames in ((1, small), (3, big)):
    written = list(frames.shape if name.endswith('.gif') else frames.shape[1:])
    assert reports[zoom]['written_shape'] == written


def test_zoom_is_planned_against_host_memory(exported, monkeypatch):
  gen, _ = loading.open_generator(exported[False])
  options = pictures.Options(num_images=4)
  rendered = pictures.planned_output_bytes('grid', gen, options)
  # Room for the render but not for its picture 32 x 32 times larger (4 8 x 8
  # samples, 3 uint8 bytes a pixel at the very least).
  memory = 2 * (rendered + 4 * 8 * 8 * 32**2 * 3) - 2
  monkeypatch.setattr(memory_plan, 'host_memory_bytes', lambda: memory)
  pictures.check_output_memory('grid', gen, options)
  zoomed = pictures.Options(num_images=4, zoom=pictures.MAX_ZOOM)
  with pytest.raises(pictures.OptionError, match='^--num_images=4 --zoom=32'):
    pictures.check_output_memory('grid', gen, zoomed)
  # The spectrum plot is drawn at its own size: zoom changes nothing.
  assert pictures.planned_output_bytes(
    'spectrum', gen, zoomed
  ) == pictures.planned_output_bytes('spectrum', gen, pictures.Options())


def _plain_adam(gen, variables, target, space, steps):
  """The inversion as one jitted Adam step at a time: (w, losses)."""
  signed = inversion.as_signed_image(target)[None]
  height, width = target.shape[:2]
  coords = grids.uniform(height, width)
  w = sampling.w_avg(gen, variables, jax.random.PRNGKey(0), num_samples=4096)
  w = jnp.reshape(w, (1, gen.style_dim))
  if space == 'pixel_w':
    w = jnp.broadcast_to(w[:, None, None], (1, height, width, gen.style_dim))
  optimizer = optax.adam(0.03)

  @jax.jit
  def step(w, state):
    def loss(w):
      image = sampling.synthesize(gen, variables, w, coords)
      return jnp.mean((image - signed) ** 2)

    value, grad = jax.value_and_grad(loss)(w)
    updates, state = optimizer.update(grad, state, w)
    return optax.apply_updates(w, updates), state, value

  state, losses = optimizer.init(w), []
  for _ in range(steps):
    w, state, value = step(w, state)
    losses.append(float(value))
  return np.asarray(w), losses


@pytest.mark.parametrize('space', inversion.SPACES)
def test_inversion_reports_progress_and_steps_like_plain_adam(space, exported):
  gen, variables = loading.open_generator(exported[False])
  target = procedural.landscape(seed=5, height=8, width=8)
  calls = []
  result = inversion.invert(
    gen,
    variables,
    target,
    space=space,
    steps=7,
    progress=lambda done, total: calls.append((done, total)),
  )
  assert calls == [(done, 7) for done in range(1, 8)]
  w, losses = _plain_adam(gen, variables, target, space, 7)
  np.testing.assert_allclose(result.w, w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(result.loss[:-1], losses, rtol=1e-4)
  # Without a progress callback: the same steps.
  again = inversion.invert(gen, variables, target, space=space, steps=7)
  np.testing.assert_allclose(again.w, result.w, rtol=1e-5, atol=1e-6)
