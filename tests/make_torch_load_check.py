"""Checks real torch reads what ``torch_pickle.save`` writes; records it.

Needs torch, which is never a dependency of cips_jax. Run by hand, outside CI,
with a Python that has torch and numpy but need not have jax: the script
imports cips_jax/torch_pickle/ without running cips_jax/__init__.py (the
subpackage imports only numpy and the standard library), so the package and
its dependencies are not needed:

    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch numpy   # the CPU wheel is enough
    /tmp/torchvenv/bin/python tests/make_torch_load_check.py

Rerun it whenever the writer's bytes change:
test_torch_pickle.py compares the sha256 of the file ``save`` writes for the
canonical object (tests/torch_check_object.py) with the one recorded here, and
fails until this script has checked the new bytes against torch.

It saves the canonical object with ``torch_pickle.save`` and

* loads it with ``torch.load(path, weights_only=True)``, plain and with
  ``mmap=True``, and compares every tensor and value with the numpy original
  exactly (dtypes, shapes, bytes, container types, int keys, tuples), the
  mapped tensors also for 64-byte aligned data;
* loads it again with ``calculate_storage_offsets`` (torch then computes where
  each storage lies instead of reading the zip headers) and
  ``TORCH_SERIALIZATION_DEBUG=1`` (torch then asserts the two agree);
* walks every record with torch's reader: each lies where torch's layout rule
  puts it (checked on a torch-written file too, to show the rule is torch's);
* saves it again with zip64 fields forced on every record (by lowering the
  writer's threshold, as the tests do) and loads that too.

Then it writes tests/data/torch_load_check.json: torch's version, the date,
the file's sha256, the number of tensors compared, and the outcome.  On a
failure it records the failure and exits with status 1.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import pathlib
import platform
import sys
import tempfile
import traceback
import types

import numpy as np
import torch
from torch.utils.serialization import config as torch_serialization_config

import torch_check_object

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load_torch_pickle():
  """cips_jax.torch_pickle, without importing the rest of the package."""
  # An empty stand-in for cips_jax, whose __init__ would import jax: importing
  # the subpackage then runs only its own modules.
  package = types.ModuleType('cips_jax')
  package.__path__ = [str(REPO / 'cips_jax')]
  sys.modules.setdefault('cips_jax', package)
  return importlib.import_module('cips_jax.torch_pickle')


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _checks(torch_pickle, folder: pathlib.Path, record: dict) -> None:
  expected = torch_check_object.build()
  path = folder / torch_check_object.FILE_NAME
  torch_pickle.save(expected, path)
  record['file_sha256'] = _sha256(path)
  record['file_bytes'] = path.stat().st_size
  steps = record['checks'] = {}

  count = torch_check_object.compare_with_torch(
    expected, torch.load(path, weights_only=True), torch
  )
  record['tensors_compared'] = count
  steps['torch.load(weights_only=True)'] = f'{count} tensors equal'

  got = torch.load(path, weights_only=True, mmap=True)
  count = torch_check_object.compare_with_torch(
    expected, got, torch, aligned=True
  )
  steps['torch.load(weights_only=True, mmap=True)'] = (
    f'{count} tensors equal, data 64-byte aligned'
  )

  os.environ['TORCH_SERIALIZATION_DEBUG'] = '1'
  torch_serialization_config.load.calculate_storage_offsets = True
  try:
    for mmap in (False, True):
      got = torch.load(path, weights_only=True, mmap=mmap)
      count = torch_check_object.compare_with_torch(expected, got, torch)
  finally:
    torch_serialization_config.load.calculate_storage_offsets = False
    del os.environ['TORCH_SERIALIZATION_DEBUG']
  steps['calculate_storage_offsets, TORCH_SERIALIZATION_DEBUG=1'] = (
    f'{count} tensors equal, plain and mmap'
  )

  control = torch_check_object.check_layout_with_torch(
    torch, torch_check_object.TORCH_WRITTEN
  )
  count = torch_check_object.check_layout_with_torch(torch, path)
  steps['layout'] = (
    f'all {count} records where torch predicts them (as are all {control} of '
    f'the torch-written {torch_check_object.TORCH_WRITTEN.name})'
  )

  forced = folder / 'zip64' / torch_check_object.FILE_NAME
  forced.parent.mkdir()
  torch_pickle.writer._ZIP32_LIMIT = 100
  try:
    torch_pickle.save(expected, forced)
  finally:
    torch_pickle.writer._ZIP32_LIMIT = 0xFFFFFFFF
  for mmap in (False, True):
    got = torch.load(forced, weights_only=True, mmap=mmap)
    count = torch_check_object.compare_with_torch(expected, got, torch)
  steps['zip64 fields on every record'] = (
    f'{count} tensors equal, plain and mmap'
  )


def main() -> int:
  torch_pickle = _load_torch_pickle()
  record = {
    'what': (
      'torch.load reads the file cips_jax.torch_pickle.save writes for '
      'tests/torch_check_object.build(), saved as '
      f'{torch_check_object.FILE_NAME}; rerun tests/make_torch_load_check.py '
      'when its sha256 changes'
    ),
    'torch_version': torch.__version__,
    'numpy_version': np.__version__,
    'python_version': platform.python_version(),
    'date': datetime.date.today().isoformat(),
  }
  with tempfile.TemporaryDirectory() as folder:
    try:
      _checks(torch_pickle, pathlib.Path(folder), record)
      record['outcome'] = 'passed'
    except Exception as error:  # recorded, then reported
      traceback.print_exc()
      failure = traceback.format_exception_only(error)[-1].strip()
      record['outcome'] = f'failed: {failure}'
  torch_check_object.RECORD.write_text(json.dumps(record, indent=2) + '\n')
  print(json.dumps(record, indent=2))
  return 0 if record['outcome'] == 'passed' else 1


if __name__ == '__main__':
  sys.exit(main())
