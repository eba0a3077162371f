"""PyTorch zip checkpoints with numpy, without torch.

Two halves, which share the archive's layout (:mod:`.formats`):

* :mod:`.reader` -- :func:`load`, a safe reader: its unpickler resolves only a
  whitelist of torch names, each to an inert stand-in, runs no pickled code
  and refuses everything else with :class:`UnsafeCheckpointError`;
* :mod:`.writer` -- :func:`save`, its inverse for plain checkpoints, writing
  the bytes ``torch.save`` lays out, so that ``torch.load(path,
  weights_only=True)`` reads them too.
"""

from cips_jax.torch_pickle.reader import ALLOWED_GLOBALS
from cips_jax.torch_pickle.reader import SCRIPT_NAMESPACE
from cips_jax.torch_pickle.reader import ScriptObject
from cips_jax.torch_pickle.reader import TorchDtype
from cips_jax.torch_pickle.reader import UnsafeCheckpointError
from cips_jax.torch_pickle.reader import load
from cips_jax.torch_pickle.writer import save

__all__ = [
  'ALLOWED_GLOBALS',
  'SCRIPT_NAMESPACE',
  'ScriptObject',
  'TorchDtype',
  'UnsafeCheckpointError',
  'load',
  'save',
]
