"""The coordinate-embedding table split over devices: same step, 1/n of the
table each.
"""

from __future__ import annotations

import json

import pytest

from cips_jax import config_validation
import support
from support import tiny_config

SCRIPT = support.TESTS / 'scripts' / 'sharded_embedding_steps.py'


def test_split_embedding_table_gives_the_replicated_step():
  env = support.environment_with_devices(8)
  result = support.run_python(SCRIPT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  size, devices = report['size'], report['devices']
  assert devices == 8
  # Each device holds 1/8 of every table.
  for name, rows in report['rows_split'].items():
    assert rows == [size // devices] * devices, name
  for name, rows in report['rows_replicated'].items():
    assert rows == [size] * devices, name
  plain, split = report['losses']
  for a, b in zip(plain, split):
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
  assert report['max_param_rel_diff'] < 1e-4


def test_a_table_that_does_not_split_evenly_is_refused():
  config = tiny_config(
    'data-dir-unused',
    **{'train.shard_embedding': True, 'train.global_batch_size': 12},
  )
  with pytest.raises(
    config_validation.ConfigError, match='model.size = 8: must be divisible'
  ):
    config_validation.validate(config, num_devices=3)
  config_validation.validate(config, num_devices=4)
