"""The conversion command: reference PyTorch checkpoint -> exported generator.

The output is an exported cips_jax generator.

    python -m cips_jax.convert --checkpoint=FILE.pt --output=DIR [--which=g_ema]

Reads the .pt file without torch (`cips_jax.torch_pickle`), infers the
architecture and writes an orbax generator checkpoint
(`cips_jax.checkpoints.export_generator`) that `python -m cips_jax.sample
--checkpoint=DIR` and `loading.open_generator(DIR)` read. Nothing is written
when the file cannot be converted.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from cips_jax import checkpoints
from cips_jax import cli
from cips_jax import convert
from cips_jax import models

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Reference .pt file (training checkpoint or state dict).'
)
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Directory to write the generator to.'
)
_WHICH = flags.DEFINE_enum(
  'which', 'g_ema', list(convert.GENERATOR_KINDS), 'Which generator to export.'
)
_ACTIVATION = flags.DEFINE_string(
  'activation', '', "Only for sine models: 'sin' or 'sinrelu'."
)
flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv):
  cli.no_positional_arguments(argv)
  module, variables = convert.load_torch_checkpoint(
    _CHECKPOINT.value, which=_WHICH.value, activation=_ACTIVATION.value or None
  )
  count = models.param_count(variables)
  logging.info(
    'converted %s: %s with %d parameters',
    _CHECKPOINT.value,
    convert.describe(module),
    count,
  )
  checkpoints.export_generator(_OUTPUT.value, module, variables)
  print(
    f'wrote {convert.describe(module)} ({count:,} parameters) to '
    f'{_OUTPUT.value}'
  )


if __name__ == '__main__':
  cli.run(main, 'cips_jax.convert')
