"""The demo notebook runs top to bottom and shows every one of its pictures.

notebooks/cips_jax_demo.ipynb is executed in a fresh Jupyter kernel with
nbclient, with CIPS_DEMO_WORKDIR in a temporary directory, twice:
- its default path, as a user meets it: the shipped models, nothing trained;
- its training path (CIPS_DEMO_TRAIN=1) in TINY mode (CIPS_DEMO_TINY=1: a few
  training steps of small models, small renders).
Each picture cell carries a tag `picture:<name>` and must display a PNG.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'notebooks' / 'cips_jax_demo.ipynb'
PICTURES = (
  'grid',
  'truncation',
  'interpolation',
  'superres',
  'foveated',
  'mixing',
  'panorama',
)
# per cell; the whole notebook takes about a minute and a half on 2 CPU cores
TIMEOUT_S = 600


def _notebook_tools():
  try:
    import ipykernel  # noqa: F401  (the kernel nbclient starts)
    import nbclient
    import nbformat
  except ImportError as error:
    pytest.fail(
      'running the demo notebook needs nbclient, nbformat and ipykernel '
      f"({error}); install the test dependencies: pip install -e '.[test]'"
    )
  return nbclient, nbformat


def _tags(cell) -> list[str]:
  return list(cell.get('metadata', {}).get('tags', []))


def _text(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream':
      parts.append(output.get('text', ''))
    elif 'data' in output:
      parts.append(output['data'].get('text/plain', ''))
  return ''.join(parts)


def test_notebook_is_stored_without_outputs():
  _, nbformat = _notebook_tools()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
        'clear the outputs of the notebook before committing it: '
        f'{cell.source[:60]!r}'
      )
  tagged = [
    tag
    for cell in nb.cells
    for tag in _tags(cell)
    if tag.startswith('picture:')
  ]
  assert sorted(tagged) == sorted(f'picture:{name}' for name in PICTURES)


@pytest.mark.parametrize('path', ['default', 'training'])
def test_notebook_runs_and_shows_every_picture(
  tmp_path, monkeypatch, path, data_dir
):
  nbclient, nbformat = _notebook_tools()
  nb = nbformat.read(NOTEBOOK, as_version=4)

  # The kernel inherits this environment: the path, a private workdir, and
  # this checkout first on its path, so it imports the package under test
  # whatever else is installed.
  training = path == 'training'
  monkeypatch.setenv('CIPS_DEMO_TINY', '1' if training else '0')
  monkeypatch.setenv('CIPS_DEMO_TRAIN', '1' if training else '0')
  # The session's procedural data, already generated: not again per run.
  monkeypatch.setenv('CIPS_DEMO_DATA', str(data_dir))
  monkeypatch.setenv('CIPS_DEMO_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv(
    'PYTHONPATH',
    os.pathsep.join(
      [str(REPO)]
      + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    ),
  )
  kernel_dir = tmp_path / 'kernel'
  kernel_dir.mkdir()

  client = nbclient.NotebookClient(
    nb,
    timeout=TIMEOUT_S,
    kernel_name='python3',
    resources={'metadata': {'path': str(kernel_dir)}},
  )
  # raises nbclient.exceptions.CellExecutionError if a cell fails
  client.execute()

  text = '\n'.join(_text(cell) for cell in nb.cells if cell.cell_type == 'code')
  assert f'from {REPO / "cips_jax"}' in text, (
    'the kernel did not import this checkout'
  )
  assert f'TINY={training}' in text
  workdir = tmp_path / 'workdir'
  trained = sorted(
    p.name for p in workdir.iterdir() if (p / 'checkpoints').is_dir()
  )
  if training:
    assert trained == ['panorama_tiny', 'quickstart_tiny'], trained
  else:
    # The default path opens the models in the box and trains nothing.
    assert trained == [], trained
    for model in ('noto_emoji', 'panorama_cpu'):
      assert f'opening {REPO / "pretrained" / model}' in text, model

  pictures = {}
  for cell in nb.cells:
    for tag in _tags(cell):
      if tag.startswith('picture:'):
        pictures[tag.split(':', 1)[1]] = sum(
          'image/png' in output.get('data', {}) for output in cell.outputs
        )
  assert set(pictures) == set(PICTURES)
  missing = [name for name, count in pictures.items() if count < 1]
  assert not missing, f'picture cells without a PNG output: {missing}'
  assert (tmp_path / 'workdir' / 'interpolation.gif').stat().st_size > 0
