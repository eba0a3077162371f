"""Reference (PyTorch) CIPS checkpoints <-> cips_jax modules and variables.

    gen, variables = convert.load_torch_checkpoint('churches.pt')  # g_ema
    disc, dvariables = convert.load_torch_checkpoint('000100.pt', which='d')
    state_dict = convert.generator_state_dict(variables['params'], gen)

Checkpoints are read with `torch_pickle`, which rebuilds tensors and plain
containers only and runs no other pickled code; torch is not needed. Accepted
forms: the reference's training checkpoint (a dict with g, d, g_ema, g_optim,
d_optim) and a bare state dict (the released checkpoints are bare g_ema state
dicts). The architecture (CIPSskip or CIPSres, size, widths, style dim, mapping
depth, channel multiplier) is inferred from names and shapes; a state dict that
does not fit gets an error naming every missing, unexpected and mis-shaped key.

The namespace gathers four modules, by job:

- `layouts`: which reference key goes where, in which shape, in our params
  (`generator_layout`, `discriminator_layout`, `params_from_layout`, ...);
- `inference`: the architecture of a state dict (`infer_generator`,
  `infer_discriminator`);
- `from_torch`: reading a .pt (`load_torch_checkpoint`, `from_state_dict`,
  `load_training_run`, ...), with `runs` (`TrainingRun`, `AdamState`);
- `to_torch`: writing one back (`generator_state_dict`,
  `discriminator_state_dict`, `training_checkpoint`, ...).

`python -m cips_jax.convert` (`cips_jax/convert_command.py`) converts from the
shell, both ways.
"""

from cips_jax.convert.from_torch import adam_state
from cips_jax.convert.from_torch import from_state_dict
from cips_jax.convert.from_torch import load_torch_checkpoint
from cips_jax.convert.from_torch import load_training_run
from cips_jax.convert.from_torch import reference_parameter_names
from cips_jax.convert.from_torch import select_state_dict
from cips_jax.convert.inference import infer_discriminator
from cips_jax.convert.inference import infer_generator
from cips_jax.convert.layouts import CheckpointMismatchError
from cips_jax.convert.layouts import describe
from cips_jax.convert.layouts import discriminator_layout
from cips_jax.convert.layouts import discriminator_params
from cips_jax.convert.layouts import generator_layout
from cips_jax.convert.layouts import generator_params
from cips_jax.convert.layouts import params_from_layout
from cips_jax.convert.layouts import reference_flatten_order
from cips_jax.convert.runs import AdamState
from cips_jax.convert.runs import TrainingRun
from cips_jax.convert.to_torch import blur_kernel
from cips_jax.convert.to_torch import discriminator_state_dict
from cips_jax.convert.to_torch import generator_state_dict
from cips_jax.convert.to_torch import training_checkpoint

__all__ = [
  'AdamState',
  'CheckpointMismatchError',
  'TrainingRun',
  'adam_state',
  'blur_kernel',
  'describe',
  'discriminator_layout',
  'discriminator_params',
  'discriminator_state_dict',
  'from_state_dict',
  'generator_layout',
  'generator_params',
  'generator_state_dict',
  'infer_discriminator',
  'infer_generator',
  'load_torch_checkpoint',
  'load_training_run',
  'params_from_layout',
  'reference_flatten_order',
  'reference_parameter_names',
  'select_state_dict',
  'training_checkpoint',
]
