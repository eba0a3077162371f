"""PyTorch zip checkpoints with numpy, without torch.

Two halves, which share the archive's layout (`.formats`):

* `.reader` -- `load`, a safe reader: its unpickler resolves only a
  whitelist of torch names, each to an inert stand-in (`.stand_ins`),
  runs no pickled code and refuses everything else with
  `UnsafeCheckpointError`; every size the file declares is checked
  before it is read (`.archive`, `.scan`), so that a load's memory
  (`.budget`) and time stay in proportion to the file (the bounds are
  listed in the reader's docstring), and messages quote what it reads with
  `cips_jax.errors.bounded_repr`;
* `.writer` -- `save`, its inverse for plain checkpoints, writing
  the bytes `torch.save` lays out, so that `torch.load(path,
  weights_only=True)` reads them too.
"""

from cips_jax.errors import UnsafeCheckpointError
from cips_jax.torch_pickle.reader import load
from cips_jax.torch_pickle.stand_ins import ScriptObject
from cips_jax.torch_pickle.stand_ins import TorchDtype
from cips_jax.torch_pickle.writer import save

__all__ = [
  'ScriptObject',
  'TorchDtype',
  'UnsafeCheckpointError',
  'load',
  'save',
]
