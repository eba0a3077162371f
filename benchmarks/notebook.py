"""The demo notebook's default path, timed as a user meets it.

    python benchmarks/notebook.py           # the default path: opens the
                                            # shipped models, trains nothing
    python benchmarks/notebook.py --train   # with TRAIN_QUICKSTART and
                                            # TRAIN_PANORAMA (tens of minutes)

Executes notebooks/cips_jax_demo.ipynb top to bottom in a fresh Jupyter kernel
(nbclient, the `test` extra), with its workdir in a temporary folder, and
prints one JSON document: the whole run's seconds (kernel start included) and
each code cell's, by the first line of its source. Install first, as the
notebook's own first cell would: `pip install -e '.[test]'`.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import common

_TRAIN = flags.DEFINE_boolean(
  'train', False, 'train the quickstart and panorama models in the notebook'
)

NOTEBOOK = (
  pathlib.Path(__file__).resolve().parent.parent
  / 'notebooks'
  / 'cips_jax_demo.ipynb'
)


def run_notebook(workdir: str, train: bool) -> dict:
  """Executes the notebook; returns its seconds, in all and per code cell."""
  import nbclient
  import nbformat

  os.environ['CIPS_DEMO_WORKDIR'] = workdir
  os.environ.pop('CIPS_DEMO_TINY', None)
  os.environ['CIPS_DEMO_TRAIN'] = '1' if train else '0'
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cells = []
  client = nbclient.NotebookClient(
    notebook, timeout=3600, kernel_name='python3'
  )
  start = time.perf_counter()
  with client.setup_kernel():
    for index, cell in enumerate(notebook.cells):
      if cell.cell_type != 'code':
        continue
      began = time.perf_counter()
      client.execute_cell(cell, index)
      cells.append(
        {
          'cell': index,
          'first_line': cell.source.splitlines()[0][:60],
          'seconds': round(time.perf_counter() - began, 2),
        }
      )
  return {'seconds': round(time.perf_counter() - start, 1), 'cells': cells}


def main(argv):
  common.check_no_arguments(argv)
  with tempfile.TemporaryDirectory() as workdir:
    report = run_notebook(workdir, _TRAIN.value)
  common.print_json(
    {
      'machine': common.machine('cpu_count', 'jax', 'backend'),
      'path': 'training' if _TRAIN.value else 'default',
      **report,
    }
  )


if __name__ == '__main__':
  app.run(main)
