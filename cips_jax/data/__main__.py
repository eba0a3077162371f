"""`python -m cips_jax.data`: the data preparation command, `data_command`.

An entry point only: the library package `cips_jax.data` never imports it,
and the command lives beside the other commands.
"""

from cips_jax import cli
from cips_jax import data_command

# --help prints the __main__ module's docstring: the command's own.
__doc__ = data_command.__doc__  # noqa: A001

if __name__ == '__main__':
  cli.run(data_command.main, 'cips_jax.data', devices_first=False)
