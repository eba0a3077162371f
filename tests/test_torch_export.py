"""Handing models back to PyTorch: reference-layout state dicts and training
checkpoints written without torch, read back bit for bit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cips_jax import checkpoints
from cips_jax import convert
from cips_jax import models
from cips_jax import reference_run
from cips_jax import torch_pickle
from cips_jax import train_state
import support

TRAIN_STEP_PT = support.DATA / 'train_step_s8.pt'


def assert_identical(ours, theirs, path='checkpoint'):
  """Same containers (dict vs OrderedDict, key order), values and bytes."""
  assert type(ours) is type(theirs), (path, type(ours), type(theirs))
  if isinstance(ours, np.ndarray):
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), path
    assert ours.tobytes() == theirs.tobytes(), path
  elif isinstance(ours, dict):
    assert list(ours) == list(theirs), path
    for key in ours:
      assert_identical(ours[key], theirs[key], f'{path}[{key!r}]')
  elif isinstance(ours, (list, tuple)):
    assert len(ours) == len(theirs), path
    for i, (a, b) in enumerate(zip(ours, theirs)):
      assert_identical(a, b, f'{path}[{i}]')
  else:
    assert ours == theirs, path


def assert_trees_bit_equal(ours, theirs):
  ours, theirs = jax.device_get((ours, theirs))
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(
    theirs
  )
  for a, b in zip(
    jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_the_reference_training_checkpoint_comes_back_unchanged(tmp_path):
  # Reference .pt -> our layout -> reference layout -> .pt: the official
  # trainer's own checkpoint, every tensor, container and key order.
  original = torch_pickle.load(TRAIN_STEP_PT)
  gen = convert.infer_generator(original['g'])
  disc = convert.infer_discriminator(original['d'])
  run = convert.load_training_run(str(TRAIN_STEP_PT), gen, disc)
  torch_pickle.save(
    convert.training_checkpoint(run, gen, disc), tmp_path / 'again.pt'
  )
  assert_identical(torch_pickle.load(tmp_path / 'again.pt'), original)


ARCHITECTURES = [
  (models.CIPSskip, None),
  (models.CIPSskip, 'sin'),
  (models.CIPSskip, 'sinrelu'),
  (models.CIPSres, None),
  (models.CIPSres, 'sin'),
]


@pytest.mark.parametrize('arch, activation', ARCHITECTURES)
def test_every_generator_round_trips_bit_exactly(arch, activation, tmp_path):
  gen = arch(
    size=8,
    hidden_size=16,
    style_dim=16,
    n_mlp=2,
    max_channels=32,
    activation=activation,
  )
  variables = models.init(gen, jax.random.PRNGKey(0))
  path = tmp_path / 'g_ema.pt'
  torch_pickle.save(
    convert.generator_state_dict(variables['params'], gen), path
  )
  module, restored = convert.load_torch_checkpoint(
    str(path), activation=activation
  )
  assert convert.describe(module) == convert.describe(gen)
  assert_trees_bit_equal(restored, variables)


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(size=16, max_channels=32),
    dict(size=8, input_channels=5, n_first_layers=1, max_channels=16),
  ],
)
def test_every_discriminator_round_trips_bit_exactly(kwargs, tmp_path):
  disc = models.Discriminator(**kwargs)
  variables = models.init(disc, jax.random.PRNGKey(1))
  path = tmp_path / 'd.pt'
  torch_pickle.save(
    {'d': convert.discriminator_state_dict(variables['params'], disc)}, path
  )
  module, restored = convert.load_torch_checkpoint(str(path), which='d')
  assert convert.describe(module) == convert.describe(disc)
  assert_trees_bit_equal(restored, variables)


@pytest.mark.parametrize('name', ['cips_skip_s8', 'cips_res_s8', 'disc_s16'])
def test_state_dicts_have_the_reference_key_order(name):
  # The fixtures list the reference's state-dict entries in order (blur
  # buffers included); torch's optimizer numbers parameters in that order.
  spec = json.loads((support.DATA / f'{name}.json').read_text())
  shapes = {e['key']: tuple(e['shape']) for e in spec['keys']}
  arrays = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  if name.startswith('disc'):
    module, variables = convert.from_state_dict(arrays, which='d')
    exported = convert.discriminator_state_dict(variables['params'], module)
    kernel = torch_pickle.load(TRAIN_STEP_PT)['d']['convs.1.conv2.0.kernel']
    np.testing.assert_array_equal(exported['convs.1.conv2.0.kernel'], kernel)
  else:
    module, variables = convert.from_state_dict(arrays)
    exported = convert.generator_state_dict(variables['params'], module)
  assert list(exported) == [e['key'] for e in spec['keys']]
  assert {k: v.shape for k, v in exported.items()} == shapes


def test_the_command_exports_a_training_run_and_a_generator(
  tiny_run, exported_generators, tmp_path
):
  workdir, _ = tiny_run
  run_pt, g_pt = tmp_path / 'run.pt', tmp_path / 'g.pt'
  result = support.run_python(
    '-m',
    'cips_jax.convert',
    '--to_torch',
    f'--checkpoint={workdir}',
    f'--output={run_pt}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'training checkpoint at step 120' in result.stdout

  config, gen, disc, state = train_state.restore_run(workdir)
  read = convert.load_training_run(str(run_pt), gen, disc)
  assert read.step == int(state.step) == 120
  assert_trees_bit_equal(
    (read.g, read.d, read.g_ema),
    (state.g_params, state.d_params, state.ema_params),
  )
  expected = reference_run.training_run(config, state)
  for ours, theirs in (
    (read.g_adam, expected.g_adam),
    (read.d_adam, expected.d_adam),
  ):
    assert ours.count == theirs.count
    assert_trees_bit_equal((ours.mu, ours.nu), (theirs.mu, theirs.nu))
  checkpoint = torch_pickle.load(run_pt)
  assert checkpoint['g_optim']['param_groups'][0]['lr'] == config.train.g_lr

  result = support.run_python(
    '-m',
    'cips_jax.convert',
    '--to_torch',
    f'--checkpoint={exported_generators[False]}',
    f'--output={g_pt}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert list(torch_pickle.load(g_pt))[0] == 'lff.ffm.conv.weight'

  # An existing output is kept.
  before = run_pt.read_bytes()
  for source, output, message in ((g_pt, run_pt, 'exists'),):
    result = support.run_python(
      '-m',
      'cips_jax.convert',
      '--to_torch',
      f'--checkpoint={source}',
      f'--output={output}',
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
  assert run_pt.read_bytes() == before


def test_the_command_exports_a_workdirs_generator(tiny_run, tmp_path):
  workdir, _ = tiny_run
  _, gen, _, state = train_state.restore_run(workdir)
  for which, params in (('g_ema', state.ema_params), ('g', state.g_params)):
    output = tmp_path / which
    result = support.run_python(
      '-m',
      'cips_jax.convert',
      f'--checkpoint={workdir}',
      f'--which={which}',
      f'--output={output}',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported_gen, variables = checkpoints.load_generator(str(output))
    assert exported_gen.size == gen.size
    assert exported_gen.hidden_size == gen.hidden_size
    assert_trees_bit_equal(variables['params'], params)
