r"""The data command: prepares the training data sets.

They are stored as ArrayRecord files, which `data.load_source` reads.

    python -m cips_jax.data procedural --data_dir=DATA_DIR [--config=s32]
    python -m cips_jax.data folder SOURCE_DIR --data_dir=DATA_DIR \
        --resolution=256 [--name=N]
    # needs TensorFlow to prepare:
    python -m cips_jax.data lsun --data_dir=DATA_DIR

`procedural` writes `procedural_landscapes/<config>`, `folder` writes
`image_folder/<name>` (unreadable files are skipped and named), `lsun` writes
`lsun/church_outdoor`.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from cips_jax import cli
from cips_jax.data import builders

_KINDS = ('procedural', 'folder', 'lsun')
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'Root of the prepared data sets.'
)
_CONFIG = flags.DEFINE_enum(
  'config',
  's32',
  [c.name for c in builders.ProceduralLandscapes.BUILDER_CONFIGS],
  'procedural: which size.',
)
_RESOLUTION = flags.DEFINE_integer(
  'resolution', None, 'folder: shorter side in pixels.'
)
_NAME = flags.DEFINE_string(
  'name', None, 'folder: data set name (default: <folder name>_<resolution>).'
)
_NUM_THREADS = flags.DEFINE_integer(
  'num_threads', None, 'folder: parallel image conversions.'
)
_DOWNLOAD_DIR = flags.DEFINE_string(
  'download_dir', None, 'lsun: where the zips are downloaded.'
)
flags.mark_flags_as_required(['data_dir'])


def _positional(argv: list[str]) -> tuple[str, list[str]]:
  """(the kind of data set, its other positional arguments)."""
  if len(argv) < 2 or argv[1] not in _KINDS:
    raise ValueError(
      f'the first argument must be one of {", ".join(_KINDS)}; got '
      f'{" ".join(argv[1:]) or "nothing"}'
    )
  kind, rest = argv[1], argv[2:]
  expected = 1 if kind == 'folder' else 0
  if len(rest) != expected:
    usage = 'folder SOURCE_DIR' if kind == 'folder' else kind
    raise ValueError(
      f'usage: python -m cips_jax.data {usage} --data_dir=DATA_DIR ...; '
      f'got {" ".join(argv[1:])}'
    )
  return kind, rest


def main(argv):
  kind, rest = _positional(argv)
  if kind == 'procedural':
    builder = builders.prepare_procedural(_DATA_DIR.value, _CONFIG.value)
  elif kind == 'folder':
    (source_dir,) = rest
    if not os.path.isdir(source_dir):
      raise FileNotFoundError(f'image folder {source_dir} does not exist')
    if _RESOLUTION.value is None:
      raise ValueError(
        'folder needs --resolution=PIXELS (the shorter side of the stored '
        'images)'
      )
    builder = builders.prepare_image_folder(
      source_dir,
      _DATA_DIR.value,
      _RESOLUTION.value,
      _NAME.value,
      num_threads=_NUM_THREADS.value,
    )
    skipped = builder.info.metadata.get('skipped_files', [])
    if skipped:
      print(
        f'skipped {len(skipped)} unreadable file(s): {", ".join(skipped)}',
        file=sys.stderr,
      )
  else:
    try:
      builder = builders.prepare_lsun_churches(
        _DATA_DIR.value, download_dir=_DOWNLOAD_DIR.value
      )
    except (
      ImportError
    ) as error:  # the missing extra: the message says what to install
      raise ValueError(str(error)) from None
  print(
    f'prepared {builder.info.full_name} in {builder.data_dir}: '
    f'{builder.info.splits["train"].num_examples} train images'
  )


if __name__ == '__main__':
  cli.run(main, 'cips_jax.data')
