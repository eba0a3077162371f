"""`python -m cips_jax.convert`: the conversion command, `convert_command`.

An entry point only: the library package `cips_jax.convert` never imports it,
and the command lives beside the other commands.
"""

from cips_jax import cli
from cips_jax import convert_command

# --help prints the __main__ module's docstring: the command's own.
__doc__ = convert_command.__doc__  # noqa: A001

if __name__ == '__main__':
  cli.run(convert_command.main, 'cips_jax.convert')
