"""The conversion command, both ways between PyTorch and cips_jax.

    # reference .pt -> an exported cips_jax generator
    python -m cips_jax.convert --checkpoint=FILE.pt --output=DIR [--which=g_ema]
    # a training workdir -> its generator, exported (what pretrained/ holds)
    python -m cips_jax.convert --checkpoint=WORKDIR --output=DIR [--which=g_ema]
    # cips_jax -> a torch.save file in the reference's layout
    python -m cips_jax.convert --to_torch --checkpoint=WORKDIR --output=RUN.pt
    python -m cips_jax.convert --to_torch --checkpoint=EXPORT --output=G.pt

Reading a .pt uses `cips_jax.torch_pickle`, never torch: the architecture is
inferred and an orbax generator checkpoint written
(`cips_jax.checkpoints.export_generator`), which `python -m cips_jax.sample
--checkpoint=DIR` and `loading.open_generator(DIR)` read.

With --to_torch, a training workdir becomes the reference's training checkpoint
(g, d, g_ema, g_optim, d_optim and step: the official train.py resumes from
it); an exported generator, or a workdir with --generator_only, becomes a bare
g_ema state dict, the form of the released checkpoints. The file loads with
`torch.load(path, weights_only=True)`.

Nothing is written when the input cannot be converted, and an existing output
is never replaced.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from cips_jax import checkpoints
from cips_jax import cli
from cips_jax import convert
from cips_jax import errors
from cips_jax import loading
from cips_jax import models
from cips_jax import reference_run
from cips_jax import torch_pickle
from cips_jax import train_state

_CHECKPOINT, _WHICH = cli.define_checkpoint_flags(
  'Input: a reference .pt file (training checkpoint or state dict) or a '
  'training workdir; with --to_torch, a training workdir or an exported '
  'generator.'
)
_OUTPUT = flags.DEFINE_string(
  'output',
  None,
  'Output: the directory of the exported generator; with --to_torch, the .pt '
  'file.',
)
_ACTIVATION = flags.DEFINE_string(
  'activation', '', "Only for sine models: 'sin' or 'sinrelu'."
)
_TO_TORCH = flags.DEFINE_bool(
  'to_torch', False, 'Write a torch.save file in the reference layout.'
)
_GENERATOR_ONLY = flags.DEFINE_bool(
  'generator_only',
  False,
  'With --to_torch and a workdir: write only the --which generator.',
)
flags.mark_flags_as_required(['checkpoint', 'output'])


def export() -> None:
  """A reference .pt or a training workdir -> an exported generator."""
  if os.path.isdir(_CHECKPOINT.value):
    # The workdir's latest checkpoint (or a step directory of one).
    module, variables = loading.open_generator(
      _CHECKPOINT.value, which=_WHICH.value
    )
  else:
    module, variables = convert.load_torch_checkpoint(
      _CHECKPOINT.value,
      which=_WHICH.value,
      activation=_ACTIVATION.value or None,
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


def to_torch() -> None:
  """A workdir or an exported generator -> a reference-layout .pt file."""
  source, output = _CHECKPOINT.value, _OUTPUT.value
  if os.path.exists(output):
    raise errors.OutputExistsError(
      f'{output} exists: choose another --output (nothing is overwritten)'
    )
  if os.path.isfile(source):
    raise errors.CheckpointError(
      f'{source} is a file: --to_torch reads a training workdir or an '
      'exported generator (a .pt file is already in PyTorch form)'
    )
  if os.path.isdir(os.path.join(source, 'checkpoints')):
    config, gen, disc, state = train_state.restore_run(source)
    run = reference_run.training_run(config, state)
    if _GENERATOR_ONLY.value:
      what = f'the {_WHICH.value} state dict of {convert.describe(gen)}'
      params = run.g_ema if _WHICH.value == 'g_ema' else run.g
      content = convert.generator_state_dict(params, gen)
    else:
      what = (
        f'the training checkpoint at step {run.step} of '
        f'{convert.describe(gen)} and {convert.describe(disc)}'
      )
      content = convert.training_checkpoint(run, gen, disc)
  else:
    gen, variables = loading.open_generator(source)
    what = f'the g_ema state dict of {convert.describe(gen)}'
    content = convert.generator_state_dict(variables['params'], gen)
  if getattr(gen, 'cylindrical', False):
    logging.warning(
      'this generator is cylindrical: the reference code has no such mode and '
      'renders its weights on a flat grid'
    )
  torch_pickle.save(content, output)
  print(f'wrote {what} to {output}')


def main(argv):
  cli.no_positional_arguments(argv)
  if _TO_TORCH.value:
    to_torch()
  else:
    if _GENERATOR_ONLY.value:
      raise errors.CheckpointError(
        '--generator_only only applies with --to_torch'
      )
    export()


if __name__ == '__main__':
  cli.run(main, 'cips_jax.convert')
