"""Data sets prepared from LMDBs: LSUN's own layout and prepare_data.py's.

Small LMDBs of both layouts are written here (one corrupt entry in each),
prepared with `preparation.prepare_lmdb` and `python -m cips_jax.data lmdb`,
read back and compared with their images decoded and resized here, and trained
on. Damaged ones (truncated, a b'length' beyond the entries, not an LMDB) are
refused in one line, before anything is written.
"""

from __future__ import annotations

import io
import logging
import os
import re

import lmdb
import numpy as np
from PIL import Image
import pytest

from cips_jax import train
from cips_jax.data import lmdb_source
from cips_jax.data import preparation
from cips_jax.data import sources
import support

SIZES = (8, 16, 32)  # stored by the prepare_data.py LMDB
NUM_PREPARED = 5  # its images per size
CORRUPT_PREPARED = '16-00002'


def _smooth(rng, height, width, channels=3):
  """A smooth colour ramp (JPEG keeps it well), different for every draw."""
  ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(
    0.3, 1, channels
  ) + np.linspace(0, 255, height)[:, None, None] * rng.uniform(0, 0.5, channels)
  image = np.clip(ramp, 0, 255).astype(np.uint8)
  return image[..., 0] if channels == 1 else image


def _encode(array, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _write_lmdb(path, entries, subdir=True):
  env = lmdb.open(str(path), map_size=1 << 24, subdir=subdir)
  with env.begin(write=True) as txn:
    for key, value in entries.items():
      txn.put(key, value)
  env.close()


@pytest.fixture(scope='module')
def lmdbs(tmp_path_factory):
  """Both layouts: {'lsun': (path, {key: bytes}), 'prepared': (path, {key:
  bytes})}, the bytes of every readable entry.
  """
  root = tmp_path_factory.mktemp('lmdbs')
  rng = np.random.default_rng(0)
  # LSUN: image ids -> WebP (as LSUN), JPEG, PNG; one gray; one truncated.
  lsun = {}
  for shape, fmt, kwargs in (
    ((20, 24, 3), 'WEBP', {'quality': 90}),
    ((24, 16, 3), 'WEBP', {'lossless': True}),
    ((16, 16, 3), 'JPEG', {'quality': 95}),
    ((32, 32, 3), 'PNG', {}),
    ((18, 16, 1), 'PNG', {}),
  ):
    key = rng.bytes(20).hex().encode('ascii')
    lsun[key] = _encode(_smooth(rng, *shape), fmt, **kwargs)
  webp = next(iter(lsun.values()))
  broken = {b'0badc0ffee' + b'0' * 30: webp[: len(webp) // 2]}
  _write_lmdb(root / 'church_outdoor_train_lmdb', lsun | broken)
  # prepare_data.py: '<size>-<index>' -> JPEG at every size, and b'length'
  # (a single-file LMDB). Every (size, index) is another picture, so the
  # content shows which size was read.
  prepared = {
    f'{size}-{str(i).zfill(5)}'.encode(): _encode(
      _smooth(rng, size, size), 'JPEG', quality=100
    )
    for size in SIZES
    for i in range(NUM_PREPARED)
  }
  jpeg = prepared[CORRUPT_PREPARED.encode()]
  broken = {CORRUPT_PREPARED.encode(): jpeg[: len(jpeg) // 2]}
  _write_lmdb(
    root / 'cips_prepared.lmdb',
    prepared | broken | {b'length': str(NUM_PREPARED).encode()},
    subdir=False,
  )
  del prepared[CORRUPT_PREPARED.encode()]
  return {
    'lsun': (root / 'church_outdoor_train_lmdb', lsun),
    'prepared': (root / 'cips_prepared.lmdb', prepared),
  }


def _expected(encoded, resolution):
  """The image decoded, made RGB and resized here, as the folder path does."""
  with Image.open(io.BytesIO(encoded)) as image:
    image = image.convert('RGB')
    w, h = image.size
    if w <= h:
      size = (resolution, int(resolution * h / w))
    else:
      size = (int(resolution * w / h), resolution)
    if size != (w, h):
      image = image.resize(size, Image.BILINEAR)
    return np.asarray(image, float)


def _assert_images(data_dir, name, expected, resolution):
  """The prepared set holds the `expected` {key: bytes} images, in order."""
  source = sources.load_source(data_dir, f'image_folder/{name}')
  assert len(source) == len(expected)
  for i, encoded in enumerate(expected.values()):
    image, want = source[i]['image'], _expected(encoded, resolution)
    assert image.dtype == np.uint8 and image.shape == want.shape, i
    assert min(image.shape[:2]) == resolution
    assert np.abs(image - want).mean() < 4, i  # JPEG 95 of the same image


def _named_in_warnings(caplog, text):
  return any(
    text in r.getMessage() and r.levelno >= logging.WARNING
    for r in caplog.records
  )


def test_lsun_layout_prepares_and_skips_the_corrupt_entry(
  lmdbs, tmp_path, caplog
):
  path, good = lmdbs['lsun']
  with caplog.at_level(logging.INFO):
    builder = preparation.prepare_lmdb(path, tmp_path, 16, 'churches')
  corrupt = '0badc0ffee' + '0' * 30
  metadata = builder.info.metadata
  assert metadata['skipped_files'] == [corrupt]
  assert metadata['num_files'] == len(good) + 1
  assert metadata['source_format'] == 'lmdb'
  assert "LSUN's layout" in metadata['layout']
  assert _named_in_warnings(caplog, corrupt)
  assert any("LSUN's layout" in r.getMessage() for r in caplog.records)
  # Key order, as LMDB keeps it.
  in_order = {key: good[key] for key in sorted(good)}
  _assert_images(tmp_path, 'churches', in_order, 16)
  gray_key = list(good)[-1]  # the fixture's last image is grayscale
  gray = sources.load_source(tmp_path, 'image_folder/churches')[
    sorted(good).index(gray_key)
  ]['image'].astype(int)
  assert np.abs(gray - gray[..., :1]).max() <= 3  # gray in 3 channels


@pytest.mark.parametrize(
  'resolution, stored', [(16, 16), (12, 16), (8, 8), (5, 8)]
)
def test_prepare_data_layout_reads_the_size_asked_or_the_next_larger(
  lmdbs, tmp_path, caplog, resolution, stored
):
  path, good = lmdbs['prepared']
  with caplog.at_level(logging.INFO):
    builder = preparation.prepare_lmdb(path, tmp_path, resolution, 'prepared')
  layout = builder.info.metadata['layout']
  assert "prepare_data.py's layout" in layout and 'sizes 8, 16, 32' in layout
  assert f'reading size {stored}' in layout
  assert any(layout in r.getMessage() for r in caplog.records)
  expected = {
    f'{stored}-{str(i).zfill(5)}': good.get(
      f'{stored}-{str(i).zfill(5)}'.encode()
    )
    for i in range(NUM_PREPARED)
  }
  if stored == 16:  # the corrupt entry is one of the 16 px images
    assert builder.info.metadata['skipped_files'] == [CORRUPT_PREPARED]
    assert _named_in_warnings(caplog, CORRUPT_PREPARED)
    del expected[CORRUPT_PREPARED]
  else:
    assert builder.info.metadata['skipped_files'] == []
  # Index order; the images of the stored size chosen, resized.
  _assert_images(tmp_path, 'prepared', expected, resolution)
  # Control: each size holds other pictures, so the content tells which size
  # was read.
  first = sources.load_source(tmp_path, 'image_folder/prepared')[0]['image']
  for other in SIZES:
    if other != stored:
      elsewhere = _expected(good[f'{other}-00000'.encode()], resolution)
      assert np.abs(first - elsewhere).mean() > 10, other


def test_select_size():
  assert lmdb_source.select_size((8, 16, 32), 16) == 16
  assert lmdb_source.select_size((32, 8, 16), 9) == 16
  assert lmdb_source.select_size((8, 16, 32), 1) == 8
  with pytest.raises(ValueError, match='sizes 8, 16, 32, none'):
    lmdb_source.select_size((8, 16, 32), 33)


def _unusable_source(kind, root):
  """A path that `prepare_lmdb` must refuse, of the given kind."""
  path = root / kind
  if kind == 'directory':  # a folder without data.mdb
    path.mkdir()
  elif kind == 'file':
    path.write_text('not an LMDB')
  elif kind == 'empty':
    _write_lmdb(path, {})
  elif kind == 'all_corrupt':
    _write_lmdb(path, {b'a': b'not an image', b'b': b'\x89PNG\r\n'})
  elif kind == 'bad_length':
    _write_lmdb(path, {b'length': b'many', b'16-00000': b'x'})
  elif kind == 'zero_size':
    path.write_bytes(b'')
  elif kind == 'long_length':  # 10**8 images claimed, 2 of size 8 stored
    jpeg = _encode(np.zeros((8, 8, 3), np.uint8), 'JPEG')
    _write_lmdb(
      path, {b'length': b'100000000', b'8-00000': jpeg, b'8-00001': jpeg}
    )
  elif kind == 'truncated':  # data.mdb cut to half: its pages are missing
    rng = np.random.default_rng(1)
    noise = {  # incompressible PNGs, a few pages each
      str(i).encode(): _encode(
        rng.integers(0, 256, (48, 48, 3), np.uint8), 'PNG'
      )
      for i in range(8)
    }
    _write_lmdb(path, noise)
    data_file = path / 'data.mdb'
    os.truncate(data_file, os.path.getsize(data_file) // 2)
  return path


@pytest.mark.parametrize(
  'kind, error, message',
  [
    ('missing', FileNotFoundError, 'does not exist'),
    ('directory', ValueError, 'is not an LMDB: a directory without data.mdb'),
    ('file', ValueError, 'is not an LMDB'),
    ('empty', ValueError, 'holds no entries'),
    ('all_corrupt', ValueError, 'none of the 2 images'),
    ('bad_length', ValueError, 'not a number of images'),
    ('zero_size', ValueError, 'is not an LMDB: .* is empty'),
    ('long_length', ValueError, 'b"length" 100000000 but only 2 "8-<index>"'),
  ],
)
def test_unusable_lmdbs_are_named_and_nothing_is_written(
  tmp_path, kind, error, message
):
  source = _unusable_source(kind, tmp_path)
  data_dir = tmp_path / 'data'
  with pytest.raises(error, match=message) as raised:
    preparation.prepare_lmdb(source, data_dir, 8, 'x')
  assert str(source) in str(raised.value)  # the message names the path
  assert not data_dir.exists(), sorted(data_dir.rglob('*'))


@pytest.mark.parametrize(
  'kind, message',
  [
    (
      'truncated',
      r'LMDB {path} is truncated: {path}/data.mdb holds \d+ bytes '
      r'but its pages need \d+',
    ),
    ('long_length', r'LMDB {path} has b"length" 100000000 but only 2 '),
    ('file', r'{path} is not an LMDB: .*File is not an LMDB file'),
    ('empty', r'LMDB {path} holds no entries'),
    ('all_corrupt', r'none of the 2 images in {path} could be read'),
  ],
)
def test_the_lmdb_command_refuses_a_damaged_lmdb_in_one_line(
  tmp_path, kind, message
):
  # Before, a truncated LMDB died of SIGBUS (LMDB maps the file; reading past
  # its end is a bus error) and a huge b'length' ran for hours.
  source = _unusable_source(kind, tmp_path)
  data_dir = tmp_path / 'data'
  result = support.run_python(
    '-m',
    'cips_jax.data',
    'lmdb',
    source,
    f'--data_dir={data_dir}',
    '--resolution=8',
    timeout=120,
  )
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
    'cips_jax.data: error: '
    + message.format(path=re.escape(str(source)))
    + '.*',
    last,
  ), last
  assert not data_dir.exists(), sorted(data_dir.rglob('*'))


def test_many_unreadable_entries_are_summarised(tmp_path, caplog):
  # One warning each for the first few, then a count: not one line per entry.
  good = _encode(np.zeros((8, 8, 3), np.uint8), 'JPEG')
  broken = {f'broken{i:02d}'.encode(): b'not an image' for i in range(8)}
  _write_lmdb(tmp_path / 'mixed', broken | {b'good': good})
  with caplog.at_level(logging.WARNING):
    builder = preparation.prepare_lmdb(tmp_path / 'mixed', tmp_path, 8, 'x')
  assert builder.info.metadata['skipped_files'] == sorted(
    key.decode() for key in broken
  )
  messages = [r.getMessage() for r in caplog.records]
  assert sum('Skipping unreadable image' in m for m in messages) == 5
  (summary,) = [m for m in messages if m.startswith('Skipped 8 unreadable')]
  assert summary.endswith(
    'broken00, broken01, broken02, broken03, broken04 ... and 3 more'
  )
  assert len(sources.load_source(tmp_path, 'image_folder/x')) == 1


def test_prepare_data_layout_without_a_large_enough_size(lmdbs, tmp_path):
  path, _ = lmdbs['prepared']
  with pytest.raises(ValueError, match='sizes 8, 16, 32, none of them'):
    preparation.prepare_lmdb(path, tmp_path / 'data', 64, 'too_big')
  assert not (tmp_path / 'data').exists()


def test_the_lmdb_command(lmdbs, tmp_path):
  path, good = lmdbs['prepared']
  data_dir = tmp_path / 'data'
  result = support.run_python(
    '-m',
    'cips_jax.data',
    'lmdb',
    path,
    f'--data_dir={data_dir}',
    '--resolution=16',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "prepare_data.py's layout" in result.stdout
  assert f'{NUM_PREPARED - 1} train images' in result.stdout
  assert (
    f'skipped 1 unreadable LMDB entries: {CORRUPT_PREPARED}' in result.stderr
  )
  # The name defaults as for a folder: <LMDB name>_<resolution>.
  expected = {
    f'16-{str(i).zfill(5)}': good[f'16-{str(i).zfill(5)}'.encode()]
    for i in range(NUM_PREPARED)
    if f'16-{str(i).zfill(5)}' != CORRUPT_PREPARED
  }
  _assert_images(data_dir, 'cips_prepared_lmdb_16', expected, 16)
  # A path that is not an LMDB: the error, no traceback.
  result = support.run_python(
    '-m',
    'cips_jax.data',
    'lmdb',
    tmp_path / 'nowhere',
    f'--data_dir={data_dir}',
    '--resolution=16',
  )
  assert result.returncode == 1
  assert 'nowhere does not exist' in result.stderr
  assert 'Traceback' not in result.stderr


def test_both_lmdb_layouts_prepare_and_train_a_few_steps(lmdbs, tmp_path):
  data_dir = tmp_path / 'data'
  for layout, name in (('lsun', 'churches'), ('prepared', 'prepared')):
    preparation.prepare_lmdb(lmdbs[layout][0], data_dir, 16, name)
    config = support.tiny_config(
      data_dir,
      **{
        'train.num_steps': 2,
        'logging.sample_every': 2,
        'logging.checkpoint_every': 2,
        'train.r1_every': 1,  # one step program to compile, not two
      },
    )
    config.data.name = f'image_folder/{name}'
    state = train.train_and_evaluate(config, str(tmp_path / name))
    assert int(state.step) == 2, layout
    assert (tmp_path / name / 'samples' / 'step_0000002.png').exists()


def test_without_the_lmdb_package_the_error_says_what_to_install(
  lmdbs, tmp_path, monkeypatch
):
  monkeypatch.setattr(lmdb_source, 'lmdb', None)
  with pytest.raises(ImportError, match=r'pip install cips_jax\[lmdb\]'):
    preparation.prepare_lmdb(lmdbs['lsun'][0], tmp_path / 'data', 16)
  assert not (tmp_path / 'data').exists()
