"""What the command lines share: one way to start, one way to report errors.

Every command (`python -m cips_jax.main`, `.sample`, `.evaluate`, `.convert`,
`.data`) ends in

    if __name__ == '__main__':
      cli.run(main, 'cips_jax.sample')

`run` parses the absl flags, keeps freed host memory for reuse on CPU-only
installs (see `host_malloc`; before any JAX computation starts a backend), and
reports the errors a user can fix as one line on stderr with exit status 1,
without a traceback:

    cips_jax.sample: error: --frames=1: an interpolation needs at least 2

Those are the library's own (`cips_jax.errors.Error`: bad flags, configs,
shapes, data, checkpoints, a locked workdir, a diverged run), the system's
refusals (`OSError`: a full disk, a read-only folder) and running out of host
or device memory. Anything else is a bug and keeps its traceback. Run a command
with `--verbosity=1` to log the traceback of a reported error as well.
"""

from __future__ import annotations

import dataclasses
import logging as logging_lib
import os
import re
import sys
import tempfile
import types
import typing
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax

from cips_jax import errors
from cips_jax import host_malloc
from cips_jax import networks
from cips_jax import platforms

# Errors with a message meant for the user (see the module docstring).
USER_ERRORS = (errors.Error, OSError)
# What lowers each command's memory, by its flags.
_MEMORY_REMEDIES = {
  'cips_jax.main': (
    '--config.train.global_batch_size',
    '--config.train.remat=True',
    '--config.train.compute_dtype=bfloat16',
  ),
  'cips_jax.sample': ('--num_images', '--chunk_size'),
  'cips_jax.evaluate': ('--batch_size',),
}


def _out_of_memory_hint(name: str, argv: list[str]) -> str:
  """What to change when the command `name`, run with `argv`, ran out of
  memory: its own flags that lower memory, less the settings already given.
  """
  remedies = _MEMORY_REMEDIES.get(name, ())
  lower = [r for r in remedies if '=' not in r]
  settings = [r for r in remedies if '=' in r and r not in argv]
  parts = [f'lower {" or ".join(lower)}'] if lower else []
  if settings:
    parts.append(f'set {" or ".join(settings)}')
  return ', or '.join(parts) or 'run it where there is more memory'


def _as_user_error(
  error: BaseException, hint: str = ''
) -> Optional[errors.Error]:
  """`error` as the library error a user can act on, or None for a bug.

  Running out of memory arrives as numpy's MemoryError or XLA's
  RESOURCE_EXHAUSTED runtime error; both become an OutOfMemoryError with a hint.
  """
  if isinstance(error, USER_ERRORS):
    return error
  is_xla_oom = isinstance(error, jax.errors.JaxRuntimeError) and str(
    error
  ).startswith('RESOURCE_EXHAUSTED')
  if is_xla_oom or isinstance(error, MemoryError):
    first_line = str(error).strip().splitlines()[0] if str(error) else ''
    return errors.OutOfMemoryError(
      f'out of memory ({first_line or type(error).__name__})'
      + (f': {hint}' if hint else '')
    )
  return None


def _drop_closed_loop_callbacks() -> None:
  """Keeps stderr readable after a failed checkpoint restore.

  When orbax's restore fails on one array (a damaged checkpoint), it closes
  its asyncio loop while tensorstore still completes the other reads; each
  completion then raises 'Event loop is closed' in a tensorstore thread,
  thousands of tracebacks around the one-line error. Depending on the path,
  tensorstore reports them through sys.unraisablehook or sys.excepthook;
  both drop exactly that error and pass every other one on.
  """
  is_closed_loop = lambda value: (  # noqa: E731
    type(value) is RuntimeError and str(value) == 'Event loop is closed'
  )
  previous_excepthook = sys.excepthook
  previous_unraisablehook = sys.unraisablehook

  def excepthook(kind, value, traceback):
    if not is_closed_loop(value):
      previous_excepthook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not is_closed_loop(unraisable.exc_value):
      previous_unraisablehook(unraisable)

  sys.excepthook = excepthook
  sys.unraisablehook = unraisablehook
  # The failed restore's sibling reads also end as asyncio tasks and futures
  # whose error nobody retrieves; asyncio logs each, traceback and all.
  logging_lib.getLogger('asyncio').addFilter(_AbandonedCheckpointReads())


class _AbandonedCheckpointReads(logging_lib.Filter):
  """Drops asyncio's 'exception was never retrieved' records of checkpoint
  reads: orbax's tasks, and tensorstore's futures, whose errors are
  ValueErrors that open with an absl status code ('OUT_OF_RANGE: ...')."""

  _STATUS = re.compile(r'[A-Z_]+: ')

  def filter(self, record):
    message = record.getMessage()
    if 'exception was never retrieved' not in message.split('\n', 1)[0]:
      return True
    error = record.exc_info[1] if record.exc_info else None
    from_a_read = 'orbax' in message or (
      isinstance(error, ValueError) and self._STATUS.match(str(error))
    )
    return not from_a_read


class _OwnInfoOnly(logging_lib.Filter):
  """Keeps the libraries' INFO chatter (orbax's dozen lines per checkpoint,
  jax's backend probing, tfds's preparation) off the console; their warnings
  and errors, and everything cips_jax logs, stay."""

  # This package's own folder: its records are kept whatever their level.
  package = os.path.dirname(os.path.abspath(__file__)) + os.sep
  # Warnings that ask nothing of a user of these commands: tfds recommends
  # OpenCV for decoding (not the bottleneck here), notes a data set's missing
  # info file while checking whether it is prepared yet (a partial one is
  # refused by name: `data.preparation`) and calls every folder or LMDB
  # builder's configuration custom (it is made per data set by design).
  not_for_users = (
    'OpenCV is not installed',
    'Variant folder ',
    'Using custom data configuration',
  )

  def filter(self, record):
    if record.pathname.startswith(self.package):
      return True
    if record.levelno < logging_lib.WARNING:
      return False
    return not str(record.msg).startswith(self.not_for_users)


def run(
  main: Callable[[list[str]], Any], name: str, *, devices_first: bool = True
) -> None:
  """Runs `main(argv)` as the command `name` (see the module docstring).

  CIPS_JAX_VERBOSE=1 in the environment brings the libraries' INFO lines back.
  With `devices_first`, jax's backends start (quietly: `start_devices`)
  before `main`; a command that must do something first (join other
  processes) or needs no device passes False and calls it itself, if at all.
  """
  host_malloc.reuse_freed_memory()
  _drop_closed_loop_callbacks()
  if not _verbose():
    logging.get_absl_handler().addFilter(_OwnInfoOnly())

  def main_reporting_errors(argv):
    try:
      if not devices_first:
        return main(argv)
      start_devices()
      # A command's programs run on this process's devices and are never
      # exported: the per-platform choices are made for them while tracing,
      # instead of every branch being traced (platforms.dispatch).
      with platforms.built_for(jax.default_backend()):
        return main(argv)
    except KeyboardInterrupt:
      # Ctrl-C: one line and the shell's status for SIGINT, no traceback.
      sys.stderr.write(f'{name}: interrupted\n')
      sys.exit(130)
    except Exception as error:  # re-raised below unless a user can act on it
      reported = _as_user_error(error, _out_of_memory_hint(name, sys.argv))
      if reported is None:
        raise
      logging.debug('%s failed', name, exc_info=True)
      sys.exit(f'{name}: error: {reported}')

  def parse_flags(argv):
    if any(arg in _HELP_ARGUMENTS for arg in argv[1:]):
      # absl's --help lists only flags defined in the main module, and exits 1.
      print(_own_flags_help(main.__module__))
      sys.exit(0)
    try:
      return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError) as error:
      # ml_collections raises these for a --config.X override that names no
      # field of the config; absl would show them with a traceback.
      sys.exit(f'{name}: error: {_unknown_config_field(argv, error)}')

  app.run(main_reporting_errors, flags_parser=parse_flags)


def start_devices() -> None:
  """Starts jax's backends with the runtimes' start-up lines off the console.

  Where no TPU is attached, libtpu (installed with the `tpu` extra, for
  XLA:TPU's compiler) still probes for one when jax starts and writes a dozen
  lines straight to the process's stderr. They are kept, and written out if
  no backend starts; CIPS_JAX_VERBOSE=1 lets them through as they come. Call
  it after `jax.distributed.initialize`, which must precede the backends.
  """
  if _verbose():
    jax.devices()
    return
  sys.stderr.flush()
  saved_stderr = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      jax.devices()
    except BaseException:
      os.dup2(saved_stderr, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors='replace'))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved_stderr, 2)
      os.close(saved_stderr)


def _verbose() -> bool:
  return os.environ.get('CIPS_JAX_VERBOSE', '') not in ('', '0')


_HELP_ARGUMENTS = ('--help', '-h', '-?', '--helpshort')


def _own_flags_help(command_module: str = '__main__') -> str:
  """The running command's docstring and every flag it defines, with help.

  `command_module`: the name of the module that defines the command's `main`.

  The command's own flags are those its module defines and those defined for
  it here (`define_flags_for`, `define_checkpoint_flags`); absl's and other
  libraries' flags stay in `--helpfull`.
  """
  main = sys.modules.get('__main__')
  lines = [(getattr(main, '__doc__', None) or '').strip(), '', 'Flags:']
  by_module = flags.FLAGS.flags_by_module_dict()
  # absl files a flag under the name of the module defining it: the script's
  # path for __main__, else the module's name (a command run through its
  # package's __main__ entry point).
  for module in dict.fromkeys((sys.argv[0], command_module, __name__)):
    if module in by_module:
      lines.append(flags.FLAGS.module_help(module))
  lines.append("\nAll flags, the libraries' included: --helpfull")
  return '\n'.join(lines)


def _unknown_config_field(argv: list[str], error: BaseException) -> str:
  """The message for a --config.X=V that names no field of the config.

  ml_collections raises a KeyError whose text is the missing key, quoted,
  then maybe a guess ('\'num_step\'\nDid you mean "num_steps" instead of
  "num_step"?'), sometimes inside an AttributeError. The message names the
  override's flag, the field in full and the guess, on one line:

    --config.train.num_step: the config has no field train.num_step (did you
    mean train.num_steps?)
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  first_line, _, rest = text.partition('\n')
  key = first_line.strip().strip('\'"')
  guess = re.search(r'Did you mean "([^"]+)"', rest)
  # The overrides' dotted paths, as given: --config.train.num_step=5 (or
  # with its value as the next argument).
  paths = [
    arg.lstrip('-').split('=', 1)[0].removeprefix('config.')
    for arg in argv[1:]
    if arg.lstrip('-').startswith('config.')
  ]
  for path in paths:
    parts = path.split('.')
    if key in parts:
      field = '.'.join(parts[: parts.index(key) + 1])
      hint = ''
      if guess:
        section = field.rpartition('.')[0]
        hint = f' (did you mean {section + "." if section else ""}{guess[1]}?)'
      return f'--config.{path}: the config has no field {field}{hint}'
  # A path that goes on below a value: 'Attribute <class 'int'>.x does not
  # exist ... Attempting to lookup: train.num_steps.x'.
  below_value = re.search(
    r"<class '(\w+)'>\.\S+ does not exist.*lookup: (\S+)", text, re.DOTALL
  )
  if below_value:
    kind, path = below_value.groups()
    parent = path.rpartition('.')[0]
    return (
      f'--config.{path}: the config has no field {path} ({parent} is '
      f'a value of type {kind}, not a section)'
    )
  named = ', '.join(f'--config.{path}' for path in paths) or '--config'
  return f'{named}: names no field of the config'


def no_positional_arguments(argv: list[str]) -> None:
  """Raises OptionError if the command line has arguments besides flags."""
  if len(argv) > 1:
    raise errors.OptionError(f'unexpected arguments: {" ".join(argv[1:])}')


def define_checkpoint_flags(
  checkpoint_help: str,
) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """The `--checkpoint` and `--which` flags the commands share.

  Returns their holders; `--which` picks one of `networks.GENERATOR_NETWORKS`
  (the EMA generator by default).
  """
  checkpoint = flags.DEFINE_string('checkpoint', None, checkpoint_help)
  which = flags.DEFINE_enum(
    'which',
    'g_ema',
    list(networks.GENERATOR_NETWORKS),
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
