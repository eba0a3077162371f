"""A reference training run in our layout: networks, Adam states and the step.

Shared by `from_torch.load_training_run` (reading a reference training
checkpoint) and `to_torch.training_checkpoint` (writing one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The keys of the reference's training checkpoint (what its train.py saves).
TRAINING_KEYS = ('g', 'd', 'g_ema', 'g_optim', 'd_optim')


@dataclasses.dataclass(frozen=True)
class AdamState:
  """A torch.optim.Adam state in our layout.

  count: the step count every parameter shares; mu, nu: the first and second
  moments, trees shaped like the parameters; hyperparameters: the 'lr',
  'betas' and 'eps' of its (first) parameter group.
  """

  count: int
  mu: Any
  nu: Any
  hyperparameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """Everything a reference training checkpoint holds, in our layout.

  step: the number of completed steps (the next step's index).
  g, d, g_ema: parameter trees; g_adam, d_adam: their Adam states.
  """

  step: int
  g: Any
  d: Any
  g_ema: Any
  g_adam: AdamState
  d_adam: AdamState
