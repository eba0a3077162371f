"""Reference checkpoints -> cips_jax: the real .pt fixture, bare state dicts,
errors, the CLI.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from cips_jax import checkpoints
from cips_jax import convert
from cips_jax import grids
from cips_jax import models
from cips_jax import sampling
from cips_jax import torch_pickle
from reference_fixtures import DATA
from reference_fixtures import reference_outputs
from reference_fixtures import reference_state_dict
from reference_fixtures import relative_error

CHECKPOINT = str(DATA / 'cips_skip_s4_checkpoint.pt')


def test_torch_checkpoint_reproduces_reference_outputs():
  gen, variables = convert.load_torch_checkpoint(CHECKPOINT)
  assert (
    isinstance(gen, models.CIPSskip) and gen.size == 4 and gen.hidden_size == 16
  )
  out = reference_outputs('cips_skip_s4')
  for side in (4, 5, 8):
    img = sampling.synthesize(gen, variables, out['w'], out[f'coords_{side}'])
    np.testing.assert_allclose(img, out[f'eval_img_{side}'], atol=1e-4, rtol=0)
  img = sampling.generate(
    gen,
    variables,
    out['z'],
    grids.uniform(4, 4),
    truncation_psi=0.6,
    w_avg=out['w_avg'],
  )
  np.testing.assert_allclose(img, out['trunc06_img'], atol=1e-4, rtol=0)


def test_bare_state_dict_and_training_checkpoint_forms():
  _, state_dict = reference_state_dict('cips_skip_s4')
  training = {
    'g': state_dict,
    'g_ema': state_dict,
    'd': {'convs.0.0.weight': np.zeros((1,))},
    'g_optim': {'state': {}},
    'd_optim': {'state': {}},
  }
  assert convert.select_state_dict(training, 'g_ema') is state_dict
  assert convert.select_state_dict(state_dict, 'g_ema') is state_dict
  with pytest.raises(
    convert.CheckpointMismatchError, match='bare state dict of a generator'
  ):
    convert.select_state_dict(state_dict, 'd')
  with pytest.raises(
    convert.CheckpointMismatchError, match="no 'g_ema' state dict"
  ):
    convert.select_state_dict({'model': 3}, 'g_ema')


def test_discriminator_from_state_dict():
  _, state_dict = reference_state_dict('disc_s16')
  disc, variables = convert.from_state_dict(state_dict, which='d')
  assert (disc.size, disc.input_channels, disc.n_first_layers) == (16, 3, 0)
  out = reference_outputs('disc_s16')
  logits = disc.apply(variables, out['images'])
  assert relative_error(logits, out['logits']) <= 1e-4


@pytest.mark.parametrize(
  'name, arch, size',
  [('cips_res_s8', 'CIPSres', 8), ('cips_skip_s8', 'CIPSskip', 8)],
)
def test_architecture_inference(name, arch, size):
  _, state_dict = reference_state_dict(name)
  gen = convert.infer_generator(state_dict)
  assert type(gen).__name__ == arch and gen.size == size and gen.n_mlp == 2


def test_full_size_architecture_is_inferred_from_shapes():
  """The 256 models: channel multiplier and widths come from the shapes of a
  real layout.
  """
  for cls in (models.CIPSskip, models.CIPSres):
    reference = cls(channel_multiplier=1)
    shapes = {
      key: np.zeros(shape, np.float32)
      if np.prod(shape) < 2**20
      else np.lib.stride_tricks.as_strided(
        np.zeros(1, np.float32), shape, [0] * len(shape)
      )
      for key, (_, shape, _) in convert.generator_layout(reference).items()
    }
    inferred = convert.infer_generator(shapes)
    assert type(inferred) is cls
    assert (
      inferred.size,
      inferred.channel_multiplier,
      inferred.style_dim,
      inferred.n_mlp,
    ) == (256, 1, 512, 8)


def test_checkpoint_from_another_architecture_names_the_keys():
  _, state_dict = reference_state_dict('cips_skip_s8')
  broken = dict(state_dict)
  del broken['linears.1.noise.weight']  # missing
  # StyleGAN2's constant input.
  broken['input.input'] = np.zeros((1, 512, 4, 4), np.float32)
  broken['linears.0.activate.bias'] = np.zeros((7,), np.float32)  # mis-shaped
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.from_state_dict(broken)
  message = str(error.value)
  for expected in (
    'missing: linears.1.noise.weight',
    'unexpected: input.input',
    'linears.0.activate.bias: checkpoint (7,), expected (512,)',
  ):
    assert expected in message


def test_sine_models_need_the_activation_spelled_out():
  gen = models.CIPSskip(
    size=4, hidden_size=8, style_dim=8, n_mlp=1, activation='sin'
  )
  layout = convert.generator_layout(gen)
  state_dict = {
    k: np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for k, (_, shape, _) in layout.items()
  }
  with pytest.raises(convert.CheckpointMismatchError, match="activation='sin'"):
    convert.from_state_dict(state_dict)
  module, variables = convert.from_state_dict(state_dict, activation='sin')
  assert module.activation == 'sin'
  np.testing.assert_array_equal(
    variables['params']['conv1']['bias'], state_dict['conv1.bias'].reshape(-1)
  )


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
  marker = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(
      'evil/data.pkl', pickle.dumps({'g_ema': Exploit()}, protocol=2)
    )
    archive.writestr('evil/byteorder', 'little')
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match='system'):
    convert.load_torch_checkpoint(str(path))
  assert not marker.exists()


def test_missing_checkpoint_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pt'):
    convert.load_torch_checkpoint(str(tmp_path / 'nope.pt'))


def test_command_line_writes_an_orbax_generator(tmp_path):
  output = tmp_path / 'exported'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cips_jax.convert',
      f'--checkpoint={CHECKPOINT}',
      f'--output={output}',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert 'CIPSskip(size=4' in result.stdout
  gen, variables = checkpoints.load_generator(str(output))
  reference_gen, reference_variables = convert.load_torch_checkpoint(CHECKPOINT)
  assert gen == reference_gen
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, variables, reference_variables
  )
  # Writing again to the same place refuses instead of clobbering what is saved.
  again = subprocess.run(
    [
      sys.executable,
      '-m',
      'cips_jax.convert',
      f'--checkpoint={CHECKPOINT}',
      f'--output={output}',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert again.returncode != 0 and 'exists' in again.stderr


def test_command_line_reports_a_bad_checkpoint(tmp_path):
  bad = tmp_path / 'corrupt.pt'
  bad.write_bytes(b'not a zip at all')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cips_jax.convert',
      f'--checkpoint={bad}',
      f'--output={tmp_path / "out"}',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert 'not a torch zip checkpoint' in result.stderr
  assert not (tmp_path / 'out').exists()
