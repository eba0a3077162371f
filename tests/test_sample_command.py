"""`python -m cips_jax.sample`: every mode on tiny checkpoints of every kind, and bad input."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from cips_jax import checkpoints, configs, loading, models, sample, sampling, train

HERE = pathlib.Path(__file__).parent
REFERENCE_PT = HERE / 'data' / 'cips_skip_s4_checkpoint.pt'


def tiny_model_config(cylindrical=False):
  config = configs.reference_config()
  m = config.model
  m.size, m.hidden_size, m.style_dim, m.n_mlp = 8, 16, 16, 1
  m.max_channels, m.d_max_channels, m.cylindrical = 16, 16, cylindrical
  config.data.resolution = config.data.crop = 8
  return config


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """An exported generator (plain) and an exported cylindrical one."""
  root = tmp_path_factory.mktemp('exports')
  paths = {}
  for cylindrical in (False, True):
    gen = models.generator_from_config(tiny_model_config(cylindrical).model)
    variables = models.init(gen, jax.random.PRNGKey(int(cylindrical)))
    paths[cylindrical] = str(root / f'cylindrical_{cylindrical}')
    checkpoints.export_generator(paths[cylindrical], gen, variables)
  return paths


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A training workdir holding one checkpoint of a fresh tiny train state (step 3)."""
  root = tmp_path_factory.mktemp('workdir')
  config = tiny_model_config()
  gen, disc = train.build_models(config)
  g_tx, d_tx = train.make_optimizers(config)
  state = train.create_state(gen, disc, g_tx, d_tx, seed=0)
  state = state.replace(step=state.step + 3,
                        g_params=jax.tree_util.tree_map(lambda p: p + 1.0, state.g_params))
  manager = checkpoints.TrainCheckpoints(str(root / 'checkpoints'), keep=2, config=config)
  manager.save(3, state)
  manager.wait()
  return str(root), state


def run_sample(capsys, *args):
  """Runs the command in this process; returns its JSON report."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['cips_jax.sample', *args])
  sample.main(['cips_jax.sample'])
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_open_generator_reads_every_kind_of_checkpoint(exported, workdir):
  path, state = workdir
  gen, variables = loading.open_generator(path)
  assert gen.size == 8 and gen.hidden_size == 16
  for got, want in zip(jax.tree_util.tree_leaves(variables['params']),
                       jax.tree_util.tree_leaves(state.ema_params)):
    np.testing.assert_array_equal(got, want)
  _, g_variables = loading.open_generator(path, which='g')   # the raw generator (+1 above)
  for got, want in zip(jax.tree_util.tree_leaves(g_variables['params']),
                       jax.tree_util.tree_leaves(state.g_params)):
    np.testing.assert_array_equal(got, want)
  gen_step, _ = loading.open_generator(f'{path}/checkpoints/3')
  assert gen_step == gen
  gen, _ = loading.open_generator(exported[True])
  assert gen.cylindrical
  gen, variables = loading.open_generator(str(REFERENCE_PT))
  assert type(gen).__name__ == 'CIPSskip' and gen.size == 4


def test_open_generator_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    loading.open_generator(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(loading.NotAGeneratorError, match='not a training workdir'):
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
  from cips_jax.data import procedural
  folder = tmp_path_factory.mktemp('reals')
  for seed in range(4):
    Image.fromarray(procedural.landscape(seed, 16, 16)).save(folder / f'{seed}.png')
  return folder


MODES = {
    'grid': ['--num_images=4'],
    'superres': ['--scale=3'],
    'foveated': ['--height=24', '--fixation=0.5,-0.25', '--num_points=200'],
    'interpolate': ['--frames=4', '--space=z', '--truncation_psi=0.7'],
    'mix': ['--num_styles=3', '--softness=1'],
    'blend': [],
}


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_mode_writes_its_file(mode, exported, tmp_path, capsys):
  out = tmp_path / ('out.gif' if mode == 'interpolate' else 'out.png')
  report = run_sample(capsys, f'--checkpoint={exported[False]}', f'--mode={mode}',
                      f'--out={out}', '--chunk_size=300', *MODES[mode])
  assert report['mode'] == mode and report['out'] == str(out)
  if mode == 'interpolate':
    with Image.open(out) as gif:
      assert gif.n_frames == 4 and gif.size == (8, 8)
    return
  image = _image(out)
  expected = {'grid': (19, 19, 3), 'superres': (24, 24, 3), 'foveated': (26, 51, 3),
              'mix': (10, 37, 3), 'blend': (28, 10, 3)}[mode]
  assert image.shape == expected, mode
  assert image.std() > 0   # not a blank picture


def test_superres_is_the_generator_on_a_denser_grid(exported, tmp_path, capsys):
  out = tmp_path / 'big.png'
  run_sample(capsys, f'--checkpoint={exported[False]}', '--mode=superres', '--scale=2',
             f'--out={out}', '--seed=5')
  gen, variables = loading.open_generator(exported[False])
  z = jax.random.normal(jax.random.PRNGKey(5), (1, gen.style_dim))
  from cips_jax import grids, summary
  expected = summary.to_uint8(sampling.render(gen, variables, sampling.mapping(gen, variables, z),
                                              grids.uniform(16, 16))[0])
  np.testing.assert_array_equal(_image(out), expected)


def test_panorama_and_cylinder_blend(exported, tmp_path, capsys):
  out = tmp_path / 'pano.png'
  report = run_sample(capsys, f'--checkpoint={exported[True]}', '--mode=panorama',
                      f'--out={out}', '--width=64')
  assert _image(out).shape == (8, 64, 3)
  assert report['seam']['seam_percentile'] < 100.0
  out = tmp_path / 'blend.png'
  report = run_sample(capsys, f'--checkpoint={exported[True]}', '--mode=blend', f'--out={out}')
  assert _image(out).shape == (28, 34, 3)    # three 8 x 32 panoramas, one per row
  assert 'seam' in report


def test_invert_and_spectrum_modes(exported, images_folder, tmp_path, capsys):
  out = tmp_path / 'invert.png'
  report = run_sample(capsys, f'--checkpoint={exported[False]}', '--mode=invert',
                      f'--target={images_folder / "0.png"}', '--steps=20', f'--out={out}')
  assert _image(out).shape == (19, 19, 3)
  assert report['psnr_w'] > report['psnr_start'] and report['psnr_pixel_w'] > report['psnr_w']
  out = tmp_path / 'spectrum.png'
  report = run_sample(capsys, f'--checkpoint={exported[False]}', '--mode=spectrum',
                      f'--real_images={images_folder}', f'--out={out}')
  assert report['num_images'] == 4 and np.isfinite(report['high_frequency_log10_ratio'])
  assert _image(out).shape == (420, 640, 3)


def test_a_workdir_and_a_reference_pt_sample(workdir, tmp_path, capsys):
  run_sample(capsys, f'--checkpoint={workdir[0]}', '--mode=grid', f'--out={tmp_path / "a.png"}',
             '--num_images=1')
  run_sample(capsys, f'--checkpoint={REFERENCE_PT}', '--mode=grid', f'--out={tmp_path / "b.png"}',
             '--num_images=1')
  assert _image(tmp_path / 'a.png').shape == (10, 10, 3)
  assert _image(tmp_path / 'b.png').shape == (6, 6, 3)


@pytest.mark.parametrize('args, message', [
    (['--mode=interpolate', '--out=x.png'], 'writes a .gif file'),
    (['--mode=grid', '--out=x.gif'], 'writes a .png file'),
    (['--mode=grid', '--out=x.png', '--num_images=0'], '--num_images=0'),
    (['--mode=foveated', '--out=x.png', '--fixation=2,0'], '--fixation=2,0'),
    (['--mode=foveated', '--out=x.png', '--fixation=a'], '--fixation=a'),
    (['--mode=interpolate', '--out=x.gif', '--frames=1'], '--frames=1'),
    (['--mode=invert', '--out=x.png'], 'needs --target'),
    (['--mode=invert', '--out=x.png', '--target=/no/such.png'], 'no such file'),
    (['--mode=mix', '--out=x.png', '--num_styles=1'], '--num_styles=1'),
    (['--mode=invert', '--out=x.png', '--perceptual_weight=-1'], '--perceptual_weight=-1'),
])
def test_bad_arguments_are_named(args, message, exported, capsys):
  with pytest.raises(app.UsageError, match=message.replace('.', r'\.')):
    run_sample(capsys, f'--checkpoint={exported[False]}', *args)


def test_bad_checkpoints_and_modes_exit_with_the_reason(exported, tmp_path, capsys):
  with pytest.raises(SystemExit, match='no checkpoint at'):
    run_sample(capsys, f'--checkpoint={tmp_path / "nothing"}', '--mode=grid',
               f'--out={tmp_path / "x.png"}')
  with pytest.raises(SystemExit, match='cylindrical=True'):
    run_sample(capsys, f'--checkpoint={exported[False]}', '--mode=panorama',
               f'--out={tmp_path / "x.png"}')
  assert not (tmp_path / 'x.png').exists()


def test_the_command_line_entry_point(exported, tmp_path):
  out = tmp_path / 'grid.png'
  result = subprocess.run(
      [sys.executable, '-m', 'cips_jax.sample', f'--checkpoint={exported[False]}',
       '--mode=grid', f'--out={out}', '--num_images=2'],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])['shape'] == [2, 8, 8, 3]
  assert 'rendering [' in result.stderr    # the progress bar
  result = subprocess.run(
      [sys.executable, '-m', 'cips_jax.sample', f'--checkpoint={exported[False]}',
       '--mode=panorama', f'--out={tmp_path / "p.png"}'],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'cylindrical=True' in result.stderr
