"""What the command lines share: one way to start, one way to report errors.

Every command (`python -m cips_jax.main`, `.sample`, `.evaluate`, `.convert`,
`.data`) ends in

    if __name__ == '__main__':
      cli.run(main, 'cips_jax.sample')

`run` parses the absl flags, keeps freed host memory for reuse on CPU-only
installs (see `host_malloc`; before any JAX computation starts a backend), and
reports the errors a user can fix (bad flag values, missing or unreadable files,
configs that cannot work) as one line on stderr with exit status 1, without a
traceback (commands check their flags by raising ValueError with a message that
names the flag):

    cips_jax.sample: error: --frames=1: an interpolation needs at least 2

Run a command with `--verbosity=1` to log the traceback as well.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging

from cips_jax import checkpoints
from cips_jax import host_malloc

# Errors with a message meant for the user: missing or unreadable files
# (OSError), values that cannot work (ValueError: bad flags, configs, shapes,
# checkpoints) and a training run that diverged (FloatingPointError).
USER_ERRORS = (OSError, ValueError, FloatingPointError)


def run(main: Callable[[list[str]], Any], name: str) -> None:
  """Runs `main(argv)` as the command `name` (see the module docstring)."""
  host_malloc.reuse_freed_memory()

  def main_reporting_errors(argv):
    try:
      return main(argv)
    except USER_ERRORS as error:
      logging.debug('%s failed', name, exc_info=True)
      sys.exit(f'{name}: error: {error}')

  app.run(main_reporting_errors)


def no_positional_arguments(argv: list[str]) -> None:
  """Raises ValueError if the command line has arguments besides flags."""
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')


def define_checkpoint_flags(
  checkpoint_help: str,
) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """The `--checkpoint` and `--which` flags the commands share.

  Returns their holders; `--which` picks one of `checkpoints.GENERATOR_NETWORKS`
  (the EMA generator by default).
  """
  checkpoint = flags.DEFINE_string('checkpoint', None, checkpoint_help)
  which = flags.DEFINE_enum(
    'which',
    'g_ema',
    list(checkpoints.GENERATOR_NETWORKS),
    "Which generator of a training checkpoint: 'g_ema' (the EMA generator, "
    "the one to sample from) or 'g' (the trained one).",
  )
  return checkpoint, which


def define_flags_for(options_class: type) -> dict[str, flags.FlagHolder]:
  """Defines one absl flag per field of a dataclass.

  Each flag has the field's name, type, default and help. Field metadata gives
  the help text ('help') and, for strings, allowed values ('choices'). Supported
  field types: int, float, str, bool, and Optional of the first three.

  Returns:
    {field name: its FlagHolder}; `options_from(options_class, holders)` builds
    the options.
  """
  hints = typing.get_type_hints(options_class)
  holders = {}
  for field in dataclasses.fields(options_class):
    kind = _base_type(hints[field.name])
    help_text = field.metadata.get('help', field.name)
    choices = field.metadata.get('choices')
    if choices:
      holders[field.name] = flags.DEFINE_enum(
        field.name, field.default, list(choices), help_text
      )
    elif kind is bool:
      holders[field.name] = flags.DEFINE_boolean(
        field.name, field.default, help_text
      )
    elif kind is int:
      holders[field.name] = flags.DEFINE_integer(
        field.name, field.default, help_text
      )
    elif kind is float:
      holders[field.name] = flags.DEFINE_float(
        field.name, field.default, help_text
      )
    elif kind is str:
      holders[field.name] = flags.DEFINE_string(
        field.name, field.default, help_text
      )
    else:
      raise TypeError(
        f'{options_class.__name__}.{field.name}: no flag type for {kind}'
      )
  return holders


def options_from(
  options_class: type, holders: dict[str, flags.FlagHolder]
) -> Any:
  """The dataclass whose fields are the flags' values."""
  return options_class(
    **{name: holder.value for name, holder in holders.items()}
  )


def _base_type(hint: Any) -> Optional[type]:
  """int for int and Optional[int], and so on."""
  arguments = [a for a in typing.get_args(hint) if a is not type(None)]
  is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
  return arguments[0] if is_union and arguments else hint
