"""Damaged exported generators are read as damaged training checkpoints are:
one `cips_jax.errors.Error` naming the file, never a traceback.

Each case damages a copy of a tiny export (conftest's `exported_generators`,
the same layout as pretrained/noto_emoji) and opens it as the commands do.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from cips_jax import errors
from cips_jax import loading


def _files(root: pathlib.Path, part: str) -> list[pathlib.Path]:
  return sorted(p for p in (root / part).rglob('*') if p.is_file())


def _largest_params_file(root):
  return max(_files(root, 'params'), key=lambda p: p.stat().st_size)


def _edit_model(root, edit):
  path = root / 'model' / 'metadata'
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))


def _set(field, value):
  return lambda root: _edit_model(
    root, lambda config: config['kwargs'].__setitem__(field, value)
  )


def _truncate(path, size=20):
  with open(path, 'r+b') as f:
    f.truncate(size)


# name -> (damage(root), the error type, a regex its message matches).
CASES = {
  'params deleted': (
    lambda root: shutil.rmtree(root / 'params'),
    errors.DamagedCheckpointError,
    r'parameters .*/params cannot be read',
  ),
  'params truncated': (
    lambda root: _truncate(_largest_params_file(root)),
    errors.DamagedCheckpointError,
    r'parameters .*/params cannot be read',
  ),
  'params manifest deleted': (
    lambda root: (root / 'params' / 'manifest.ocdbt').unlink(),
    errors.DamagedCheckpointError,
    r'parameters .*/params cannot be read',
  ),
  'model deleted': (
    lambda root: shutil.rmtree(root / 'model'),
    errors.DamagedCheckpointError,
    r'model description .*/model cannot be read',
  ),
  'model garbage': (
    lambda root: (root / 'model' / 'metadata').write_bytes(b'\x00{not json'),
    errors.DamagedCheckpointError,
    r'model description .*/model cannot be read',
  ),
  'model a list': (
    lambda root: (root / 'model' / 'metadata').write_text('[1, 2]'),
    errors.CheckpointError,
    r'/model: not a generator description',
  ),
  'wrong class': (
    lambda root: _edit_model(root, lambda c: c.__setitem__('class', 'Evil')),
    errors.CheckpointError,
    r"/model: unknown generator class 'Evil'",
  ),
  'unknown field': (
    _set('evil', 1),
    errors.CheckpointError,
    r"/model: CIPSskip has no field 'evil'",
  ),
  'widths that do not match the params': (
    _set('hidden_size', 32),
    errors.CheckpointMismatchError,
    r'parameters .*/params do not match the architecture',
  ),
  'a negative size': (
    _set('size', -8),
    errors.CheckpointError,
    r'CIPSskip.size = -8: must be in \[1, 65536\]',
  ),
  'a huge width': (
    _set('hidden_size', 10**9),
    errors.CheckpointError,
    r'CIPSskip.hidden_size = 1000000000: must be in',
  ),
  'a string for an int': (
    _set('style_dim', '16'),
    errors.CheckpointError,
    r"CIPSskip.style_dim = '16': must be an integer",
  ),
  'a non-finite float': (
    _set('lr_mlp', float('nan')),
    errors.CheckpointError,
    r'CIPSskip.lr_mlp = nan: must be finite and positive',
  ),
  'an unknown dtype': (
    _set('dtype', 'int8'),
    errors.CheckpointError,
    r"CIPSskip.dtype = 'int8': must be one of",
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_a_damaged_export_is_one_named_error(
  case, exported_generators, tmp_path
):
  root = tmp_path / 'export'
  shutil.copytree(exported_generators[False], root)
  damage, error_type, pattern = CASES[case]
  damage(root)
  with pytest.raises(error_type, match=pattern) as raised:
    loading.open_generator(str(root))
  message = str(raised.value)
  assert '\n' not in message, message
  assert len(message) < 600, message


def test_the_undamaged_copy_opens(exported_generators, tmp_path):
  root = tmp_path / 'export'
  shutil.copytree(exported_generators[False], root)
  gen, variables = loading.open_generator(str(root))
  assert gen.size == 8 and 'params' in variables
