"""The emoji ablation's variants (benchmarks/emoji_ablation.py) are valid runs.

Each variant reaches `python -m cips_jax.main` as `--config.FIELD=VALUE`
overrides of experiments/emoji.py: a misspelt field or a value the config
refuses would only show once its run starts, minutes into the ablation.
"""

from __future__ import annotations

import json
import sys

from absl import flags
import pytest

from cips_jax import config_validation
from cips_jax import configs
import support

sys.path.insert(0, str(support.REPO / 'benchmarks'))
import emoji_ablation  # noqa: E402


def _emoji_config():
  return configs.from_file(support.REPO / 'experiments' / 'emoji.py')


def _overridden(arguments: list[str]):
  """experiments/emoji.py with the `--config.section.field=value` arguments
  applied as the command line would: the field must exist, and the value
  parse as its type."""
  config = _emoji_config()
  for argument in arguments[1:]:
    dotted, text = argument.removeprefix('--config.').split('=', 1)
    section, field = dotted.split('.')
    assert field in config[section], f'no field {dotted}'
    kind = type(config[section][field])
    config[section][field] = float(text) if kind is float else kind(text)
  return config


@pytest.mark.parametrize('name', sorted(emoji_ablation.VARIANTS))
def test_each_variant_is_a_valid_run_with_its_overrides(name):
  arguments = emoji_ablation.config_arguments(name, data_dir='/data')
  assert arguments[0] == '--config=experiments/emoji.py'
  config = _overridden(arguments)
  config_validation.validate(config, 1)
  _, overrides = emoji_ablation.VARIANTS[name]
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    expected = pytest.approx(value) if isinstance(value, float) else value
    assert config[section][field] == expected, dotted
  assert config.data.data_dir == '/data'
  # The budget is all training: no FID during the run.
  assert config.logging.eval_every_steps == 0


def test_the_default_variants_are_known():
  default = flags.FLAGS['variants'].default
  assert set(default) <= set(emoji_ablation.VARIANTS)
  assert 'card' in default and len(default) >= 5


def test_the_docs_table_is_the_checked_in_json_and_the_card_quotes_it(tmp_path):
  results = support.REPO / 'benchmarks' / 'results' / 'emoji_ablation.json'
  document = json.loads(results.read_text())
  page = tmp_path / 'page.md'
  emoji_ablation.write_table(document, str(page))
  docs = support.REPO / 'docs' / 'emoji_ablation.md'
  assert page.read_text() == docs.read_text()
  rows = [
    line for line in docs.read_text().splitlines() if line.startswith('| `')
  ]
  assert len(rows) == len(document['variants']) >= 5
  card = (support.REPO / 'pretrained' / 'noto_emoji' / 'README.md').read_text()
  for row in rows:
    assert row in card, row
