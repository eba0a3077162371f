r"""The data command: prepares the training data sets.

They are stored as ArrayRecord files, which `data.load_source` reads.

    python -m cips_jax.data procedural --data_dir=DATA_DIR [--config=s32]
    python -m cips_jax.data folder SOURCE_DIR --data_dir=DATA_DIR \
        --resolution=256 [--name=N] [--background=white]
    # needs the lmdb extra (pip install cips_jax[lmdb]):
    python -m cips_jax.data lmdb LMDB_PATH --data_dir=DATA_DIR \
        --resolution=256 [--name=N] [--background=white]
    # needs TensorFlow to prepare:
    python -m cips_jax.data lsun --data_dir=DATA_DIR

`procedural` writes `procedural_landscapes/<config>`, `folder` writes
`image_folder/<name>` (unreadable files are skipped, counted and the first few
named; the name defaults to <folder name>_<resolution>), `lsun` writes
`lsun/church_outdoor`. Images with transparency (an alpha channel or a
transparent palette entry) are composited on --background: white (the
default), black, R,G,B (each 0-255, e.g. 0,128,255) or #rrggbb.

`lmdb` writes `image_folder/<name>` as `folder` does, from an LMDB (a directory
holding data.mdb, or a single file): LSUN's own (e.g. church_outdoor_train_lmdb
from the LSUN download; image id -> WebP/JPEG/PNG) or one the reference's
prepare_data.py made ('<size>-<index>' -> JPEG, and 'length'; the entries of
size --resolution are read, else those of the smallest larger size). The layout
found is logged; entries that do not decode are skipped as files are. A
truncated LMDB or a 'length' beyond the entries is refused before anything is
written; a preparation stopped by SIGINT or SIGTERM removes its partial output.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from cips_jax import cli
from cips_jax import errors
from cips_jax.data import builders
from cips_jax.data import preparation

_KINDS = ('procedural', 'folder', 'lmdb', 'lsun')
_SOURCE = {'folder': 'SOURCE_DIR', 'lmdb': 'LMDB_PATH'}  # their one argument
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
  'resolution', None, 'folder, lmdb: shorter side in pixels.'
)
_NAME = flags.DEFINE_string(
  'name',
  None,
  'folder, lmdb: data set name (default: <folder or LMDB name>_<resolution>).',
)
_NUM_THREADS = flags.DEFINE_integer(
  'num_threads', None, 'folder, lmdb: parallel image conversions.'
)
_BACKGROUND = flags.DEFINE_string(
  'background',
  'white',
  'folder, lmdb: the colour transparent images are composited on: '
  f'{preparation.BACKGROUND_FORMS}.',
)
_DOWNLOAD_DIR = flags.DEFINE_string(
  'download_dir', None, 'lsun: where the zips are downloaded.'
)
flags.mark_flags_as_required(['data_dir'])


def _positional(argv: list[str]) -> tuple[str, list[str]]:
  """(the kind of data set, its other positional arguments)."""
  if len(argv) < 2 or argv[1] not in _KINDS:
    raise errors.DataError(
      f'the first argument must be one of {", ".join(_KINDS)}; got '
      f'{" ".join(argv[1:]) or "nothing"}'
    )
  kind, rest = argv[1], argv[2:]
  expected = 1 if kind in _SOURCE else 0
  if len(rest) != expected:
    usage = f'{kind} {_SOURCE[kind]}' if kind in _SOURCE else kind
    raise errors.DataError(
      f'usage: python -m cips_jax.data {usage} --data_dir=DATA_DIR ...; '
      f'got {" ".join(argv[1:])}'
    )
  return kind, rest


# The largest stored side --resolution accepts.
MAX_RESOLUTION = 8192


def main(argv):
  kind, rest = _positional(argv)
  if kind == 'procedural':
    builder = preparation.prepare_procedural(_DATA_DIR.value, _CONFIG.value)
  elif kind in _SOURCE:
    (source,) = rest
    if kind == 'folder' and not os.path.isdir(source):
      raise errors.MissingInputError(f'image folder {source} does not exist')
    if _RESOLUTION.value is None:
      raise errors.DataError(
        f'{kind} needs --resolution=PIXELS (the shorter side of the stored '
        'images)'
      )
    if not 1 <= _RESOLUTION.value <= MAX_RESOLUTION:
      # Every stored image is decoded and resized to this side in memory.
      raise errors.DataError(
        f'--resolution={_RESOLUTION.value}: must be in [1, {MAX_RESOLUTION}] '
        '(the shorter side of the stored images; the largest recipe trains '
        'at 1024)'
      )
    background = preparation.parse_background(_BACKGROUND.value, '--background')
    prepare = (
      preparation.prepare_image_folder
      if kind == 'folder'
      else preparation.prepare_lmdb
    )
    try:
      builder = prepare(
        source,
        _DATA_DIR.value,
        _RESOLUTION.value,
        _NAME.value,
        num_threads=_NUM_THREADS.value,
        background=background,
      )
    except ImportError as error:  # no lmdb: the message says what to install
      raise errors.DataError(str(error)) from None
    metadata = builder.info.metadata
    if kind == 'lmdb':
      print(f'read {source}: {metadata.get("layout")}')
    skipped = metadata.get('skipped_files', [])
    if skipped:
      what = 'file(s)' if kind == 'folder' else 'LMDB entries'
      print(
        f'skipped {len(skipped)} unreadable {what}: '
        f'{builders.name_some(skipped)}',
        file=sys.stderr,
      )
  else:
    try:
      builder = preparation.prepare_lsun_churches(
        _DATA_DIR.value, download_dir=_DOWNLOAD_DIR.value
      )
    except (
      ImportError
    ) as error:  # the missing extra: the message says what to install
      raise errors.DataError(str(error)) from None
  print(
    f'prepared {builder.info.full_name} in {builder.data_dir}: '
    f'{builder.info.splits["train"].num_examples} train images'
  )


if __name__ == '__main__':
  cli.run(main, 'cips_jax.data', devices_first=False)
