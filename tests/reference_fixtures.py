"""Loads the reference fixtures in tests/data (outputs of the PyTorch reference
code).

Weights are rebuilt from the seed exactly as ../shared/fixtures/README.md
describes, in the reference's own layout and names: a state dict that
`cips_jax.convert` must understand.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

DATA = pathlib.Path(__file__).parent / 'data'


def reference_state_dict(name: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (the fixture's JSON description, its reference state dict)."""
  spec = json.loads((DATA / f'{name}.json').read_text())
  rng = np.random.default_rng(spec['seed'])
  state_dict = {}
  for entry in spec['keys']:
    if entry.get('buffer'):
      continue  # blur kernels: the model builds them itself
    noise = rng.standard_normal(entry['shape'])
    state_dict[entry['key']] = (entry['base'] + entry['std'] * noise).astype(
      np.float32
    )
  return spec, state_dict


def reference_outputs(name: str) -> dict[str, np.ndarray]:
  """The fixture's inputs and reference outputs (NHWC float32 arrays)."""
  with np.load(DATA / f'{name}.npz') as arrays:
    return {key: arrays[key] for key in arrays.files}


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = (
    np.asarray(actual, np.float64),
    np.asarray(expected, np.float64),
  )
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
