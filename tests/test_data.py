"""The data package: procedural images, tfds builders (without TensorFlow) and
the pipeline.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from cips_jax import grids
from cips_jax.data import builders
from cips_jax.data import pipeline
from cips_jax.data import preparation
from cips_jax.data import procedural
from cips_jax.data import sources
from cips_jax.data.pipeline import TrainBatches
import support

# -----------------------------------------------------------------------------
# Procedural images
# ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'render, shape',
  [(procedural.landscape, (32, 48)), (procedural.panorama, (16, 64))],
)
def test_procedural_is_deterministic(render, shape):
  a, b, c = render(7, *shape), render(7, *shape), render(8, *shape)
  assert a.shape == shape + (3,) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 5  # another seed is another scene


def test_procedural_images_have_structure():
  images = np.stack(
    [procedural.landscape(i, 32, 32) for i in range(32)]
  ).astype(float)
  # Vertical structure (sky above, ground below) in every image, and varied
  # colours.
  top, bottom = (
    images[:, :8].mean(axis=(1, 2, 3)),
    images[:, -8:].mean(axis=(1, 2, 3)),
  )
  assert np.all(np.abs(top - bottom) > 5)
  # Per-image mean colours differ.
  assert images.mean(axis=(1, 2)).std(axis=0).min() > 10
  assert len(np.unique(images.reshape(-1, 3), axis=0)) > 1000


def test_procedural_scene_does_not_depend_on_size():
  small = procedural.landscape(3, 32, 32).astype(float)
  big = (
    procedural.landscape(3, 64, 64)
    .astype(float)
    .reshape(32, 2, 32, 2, 3)
    .mean((1, 3))
  )
  other = procedural.landscape(4, 32, 32).astype(float)
  assert np.abs(small - big).mean() < 0.25 * np.abs(small - other).mean()


def test_panorama_wraps_around():
  for seed in range(8):
    pano = procedural.panorama(seed, 32, 128).astype(float)

    def col_diff(a, b):
      return np.abs(pano[:, a] - pano[:, b]).mean()

    seam = col_diff(0, -1)
    # The seam is just another pair of neighbouring columns: as small as its
    # neighbours.
    near_seam = np.mean(
      [col_diff(0, 1), col_diff(1, 2), col_diff(-2, -1), col_diff(-3, -2)]
    )
    assert seam <= 2 * near_seam + 1.0, seed
    # Control: a seam anywhere else (here cutting at 3/4 of the width) is much
    # larger.
    shifted_seam = col_diff(0, 95)
    assert seam < 0.5 * shifted_seam + 1.0, seed
  # An ordinary landscape does not wrap.
  land = [procedural.landscape(s, 32, 32).astype(float) for s in range(8)]
  assert np.mean([np.abs(x[:, 0] - x[:, -1]).mean() for x in land]) > 5


# ----------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------


def _save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


@pytest.fixture(scope='module')
def image_tree(tmp_path_factory):
  """A folder of test images; returns (folder, {relative path: (width, height)}
  readable).
  """
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)

  def smooth(h, w, c):
    return np.clip(
      np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, c)
      + np.linspace(0, 255, h)[:, None, None] * rng.uniform(0, 0.5, c),
      0,
      255,
    ).astype(np.uint8)

  _save(root / 'b_wide.jpg', smooth(40, 60, 3), quality=95)
  _save(root / 'a_tall.PNG', smooth(50, 30, 3))  # upper-case extension
  _save(root / 'nested' / 'deeper' / 'square.jpeg', smooth(24, 24, 3))
  _save(root / 'nested' / 'gray.png', smooth(36, 20, 1)[..., 0])  # mode L
  # Mode RGBA, opaque: it keeps its colours (transparent ones are tested below).
  rgba = smooth(20, 44, 4)
  rgba[..., 3] = 255
  _save(root / 'nested' / 'rgba.png', rgba)
  _save(root / 'small.webp', smooth(12, 18, 3), lossless=True)  # upscaled to 16
  Image.fromarray(smooth(30, 30, 3)).convert('P').save(root / 'palette.png')
  good = {
    'b_wide.jpg': (60, 40),
    'a_tall.PNG': (30, 50),
    'nested/deeper/square.jpeg': (24, 24),
    'nested/gray.png': (20, 36),
    'nested/rgba.png': (44, 20),
    'small.webp': (18, 12),
    'palette.png': (30, 30),
  }
  # Broken files: a truncated JPEG and a text file with an image extension.
  jpeg = (root / 'b_wide.jpg').read_bytes()
  (root / 'nested' / 'truncated.jpg').write_bytes(jpeg[: len(jpeg) // 2])
  (root / 'not_an_image.jpg').write_text('this is not a JPEG')
  (root / 'notes.txt').write_text('ignored: not an image extension')
  return root, good


def _expected_size(width, height, resolution):
  if width <= height:
    return resolution, int(resolution * height / width)
  return int(resolution * width / height), resolution


def test_image_folder_prepares_and_skips_corrupt_files(
  image_tree, tmp_path, caplog
):
  source, good = image_tree
  resolution = 16
  with caplog.at_level(logging.WARNING):
    builder = preparation.prepare_image_folder(
      source, tmp_path, resolution, 'test_images'
    )
  skipped = ['nested/truncated.jpg', 'not_an_image.jpg']
  assert builder.info.metadata['skipped_files'] == skipped
  for name in skipped:  # each one named in the log
    assert any(
      name in r.getMessage() and r.levelno >= logging.WARNING
      for r in caplog.records
    )

  source_ds = sources.load_source(tmp_path, 'image_folder/test_images')
  order = sorted(good)  # the sorted relative paths of the readable files
  assert len(source_ds) == len(order)
  for i, name in enumerate(order):
    image = source_ds[i]['image']
    w, h = _expected_size(*good[name], resolution)
    assert image.dtype == np.uint8 and image.shape == (h, w, 3), name
    assert min(image.shape[:2]) == resolution
    # The content is the original, converted to RGB and resized (JPEG 95: small
    # error).
    with Image.open(source / name) as original:
      expected = np.asarray(
        original.convert('RGB').resize((w, h), Image.BILINEAR), float
      )
    assert np.abs(image - expected).mean() < 4, name
    if name == 'nested/gray.png':
      # Gray in 3 channels.
      assert np.abs(image.astype(int) - image[..., :1]).max() <= 3

  # The same name cannot silently stand for another resolution.
  with pytest.raises(ValueError, match='already holds'):
    preparation.prepare_image_folder(source, tmp_path, 8, 'test_images')


def test_an_image_too_large_to_decode_is_skipped_from_its_header(
  tmp_path, caplog
):
  # A 16-bit PNG of 9000 x 9000 compresses to a few hundred KB; decoded and
  # converted it took 5.2 GB. Its header is read, never its pixels.
  source = tmp_path / 'photos'
  source.mkdir()
  Image.new('I;16', (9000, 9000)).save(source / 'huge.png')
  Image.fromarray(procedural.landscape(0, 12, 12)).save(source / 'ok.png')
  with caplog.at_level(logging.WARNING):
    builder = preparation.prepare_image_folder(
      source, tmp_path / 'data', 8, 'x'
    )
  assert builder.info.metadata['skipped_files'] == ['huge.png']
  assert any('9000x9000 pixels' in r.getMessage() for r in caplog.records)
  assert len(sources.load_source(tmp_path / 'data', 'image_folder/x')) == 1


def test_image_folder_from_manual_dir(image_tree, tmp_path):
  import tensorflow_datasets as tfds

  source, good = image_tree
  config = builders.ImageFolderConfig(name='manual', resolution=8)
  builder = builders.ImageFolder(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare(
    file_format='array_record',
    download_config=tfds.download.DownloadConfig(manual_dir=str(source)),
  )
  data = sources.load_source(tmp_path, 'image_folder/manual')
  assert len(data) == len(good)
  assert all(min(data[i]['image'].shape[:2]) == 8 for i in range(len(data)))


@pytest.fixture(scope='module')
def procedural_s32(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  preparation.prepare_procedural(data_dir, 's32')
  return sources.load_source(data_dir, 'procedural_landscapes/s32')


def test_procedural_builder_reads_back(procedural_s32):
  assert len(procedural_s32) == 2048
  # Record i is the scene with seed i, losslessly (PNG)
  for i in (0, 1, 777, 2047):
    np.testing.assert_array_equal(
      procedural_s32[i]['image'], procedural.landscape(i, 32, 32)
    )
  records = procedural_s32.__getitems__([5, 3])
  np.testing.assert_array_equal(
    records[1]['image'], procedural.landscape(3, 32, 32)
  )


def test_load_source_names_the_missing_directory_and_command(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    sources.load_source(tmp_path, 'procedural_landscapes/s64')
  message = str(err.value)
  assert str(tmp_path / 'procedural_landscapes' / 's64') in message
  assert (
    f'python -m cips_jax.data procedural --data_dir {tmp_path} --config s64'
    in message
  )
  with pytest.raises(FileNotFoundError, match='python -m cips_jax.data folder'):
    sources.load_source(tmp_path, 'image_folder/mine')
  # Given the training resolution, the command is the one to run (but for the
  # images' folder); `check_prepared` says the same without reading anything.
  for check in (sources.load_source, sources.check_prepared):
    with pytest.raises(FileNotFoundError) as err:
      check(tmp_path, 'image_folder/mine', resolution=64)
    assert (
      f'python -m cips_jax.data folder SOURCE_DIR --data_dir {tmp_path} '
      '--resolution 64 --name mine\n' in str(err.value)
    )
    assert 'RESOLUTION' not in str(err.value)
  sources.check_prepared(tmp_path, 'procedural_landscapes/s64')  # made on use
  assert list(tmp_path.iterdir()) == []


def _folder_command(source, data_dir, *flags):
  """`python -m cips_jax.data folder` at resolution 8, name 'x'."""
  return support.run_python(
    '-m',
    'cips_jax.data',
    'folder',
    source,
    f'--data_dir={data_dir}',
    '--resolution=8',
    '--name=x',
    *flags,
    timeout=120,
  )


@pytest.mark.parametrize(
  'files, message',
  [
    ({'notes.txt': b'no image'}, 'no .jpg/.jpeg/.png/.webp files under {}'),
    (
      {'a.jpg': b'not a JPEG', 'b/c.png': b'\x89PNG\r\n'},
      'none of the 2 images in {} could be read',
    ),
  ],
  ids=['no_images', 'all_corrupt'],
)
def test_the_folder_command_refuses_a_folder_without_images_in_one_line(
  tmp_path, files, message
):
  source = tmp_path / 'in'
  for name, content in files.items():
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_bytes(content)
  result = _folder_command(source, tmp_path / 'data')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last == f'cips_jax.data: error: {message.format(source)}'
  assert not (tmp_path / 'data').exists(), sorted(tmp_path.rglob('data/*'))


def test_many_unreadable_files_are_summarised_not_listed(tmp_path):
  source = tmp_path / 'in'
  _save(source / 'good.png', np.zeros((8, 8, 3), np.uint8))
  for i in range(8):
    (source / f'bad{i}.jpg').write_text('not a JPEG')
  result = _folder_command(source, tmp_path / 'data')
  assert result.returncode == 0, result.stderr[-3000:]
  # One warning each for the first five, then a count naming them.
  assert result.stderr.count('Skipping unreadable image') == 5
  first_five = 'bad0.jpg, bad1.jpg, bad2.jpg, bad3.jpg, bad4.jpg'
  summary = f'Skipped 8 unreadable image(s) of 9 in {source}: {first_five}'
  assert f'{summary} ... and 3 more' in result.stderr
  assert (
    f'skipped 8 unreadable file(s): {first_five} ... and 3 more\n'
    in result.stderr
  )
  assert len(sources.load_source(tmp_path / 'data', 'image_folder/x')) == 1


# The folder command with each image conversion slowed down, announcing the
# first one in a file: something to stop in the middle.
_SLOW_FOLDER_COMMAND = """
import pathlib, runpy, sys, time
from cips_jax.data import builders
marker, *sys.argv[1:] = sys.argv[1:]
convert = builders._load_resized_jpeg
def slow(*args):
  pathlib.Path(marker).touch()
  time.sleep(0.5)
  return convert(*args)
builders._load_resized_jpeg = slow
runpy.run_module('cips_jax.data', run_name='__main__')
"""


def _assert_not_prepared(data_dir, name='image_folder/x'):
  with pytest.raises(FileNotFoundError) as raised:
    sources.load_source(data_dir, name)
  assert 'python -m cips_jax.data folder SOURCE_DIR' in str(raised.value)
  return str(raised.value)


def test_a_preparation_stopped_by_sigterm_leaves_nothing(image_tree, tmp_path):
  # SIGTERM's default action ended the process at once, leaving tfds's
  # incomplete.* folder (for a large set, gigabytes) and the folders above it.
  source, good = image_tree
  data_dir, marker = tmp_path / 'data', tmp_path / 'started'
  process = subprocess.Popen(
    [
      sys.executable,
      '-c',
      _SLOW_FOLDER_COMMAND,
      marker,
      'folder',
      source,
      f'--data_dir={data_dir}',
      '--resolution=8',
      '--name=x',
      '--num_threads=1',
    ],
    cwd=support.REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None:
      assert time.monotonic() < deadline, 'the preparation did not start'
      time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == -signal.SIGTERM, stderr[-3000:]
  assert 'SIGTERM: stopped preparing' in stderr
  assert not data_dir.exists(), sorted(data_dir.rglob('*'))
  _assert_not_prepared(data_dir)
  # Preparing again works.
  preparation.prepare_image_folder(source, data_dir, 8, 'x')
  assert len(sources.load_source(data_dir, 'image_folder/x')) == len(good)


def test_an_interrupted_preparation_leaves_nothing(
  image_tree, tmp_path, monkeypatch
):
  source, good = image_tree
  convert = builders._load_resized_jpeg
  calls = []

  def interrupted(*args):
    calls.append(args)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return convert(*args)

  monkeypatch.setattr(builders, '_load_resized_jpeg', interrupted)
  with pytest.raises(KeyboardInterrupt):
    preparation.prepare_image_folder(source, tmp_path, 8, 'x', num_threads=1)
  assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob('*'))
  _assert_not_prepared(tmp_path)
  monkeypatch.undo()
  preparation.prepare_image_folder(source, tmp_path, 8, 'x')
  assert len(sources.load_source(tmp_path, 'image_folder/x')) == len(good)


def test_what_a_killed_preparation_left_is_named_not_read(
  image_tree, tmp_path, caplog
):
  # A SIGKILL leaves tfds's temporary folder; a copy cut short, a version
  # folder without dataset_info.json (tfds writes it last).
  source, good = image_tree
  config_dir = tmp_path / 'image_folder' / 'x'
  partial = config_dir / 'incomplete.ABC123_1.0.0'
  partial.mkdir(parents=True)
  (partial / 'image_folder-train.array_record-00000-of-00001').write_bytes(
    b'partial'
  )
  (config_dir / '1.0.0').mkdir()
  message = _assert_not_prepared(tmp_path)
  assert 'ignored 1.0.0, incomplete.ABC123_1.0.0, the partial output' in message
  with pytest.raises(FileNotFoundError, match='ignored 1.0.0, incomplete'):
    sources.open_source(tmp_path, 'image_folder/x')
  # tfds would reuse the version folder as it is, writing nothing.
  with pytest.raises(ValueError, match='1.0.0 holds an unfinished data set'):
    preparation.prepare_image_folder(source, tmp_path, 8, 'x')
  (config_dir / '1.0.0').rmdir()
  with caplog.at_level(logging.WARNING):
    preparation.prepare_image_folder(source, tmp_path, 8, 'x')
  assert any(
    str(partial) in r.getMessage() and r.levelno == logging.WARNING
    for r in caplog.records
  )
  assert len(sources.load_source(tmp_path, 'image_folder/x')) == len(good)
  assert partial.exists()  # maybe another preparation's: not removed


@pytest.mark.skipif(
  importlib.util.find_spec('tensorflow') is not None,
  reason='TensorFlow is installed',
)
def test_lsun_without_tensorflow_says_what_to_install(tmp_path):
  expected = r'preparing LSUN needs TensorFlow: pip install cips_jax\[lsun\]'
  with pytest.raises(ImportError, match=expected):
    preparation.prepare_lsun_churches(tmp_path)


# ------------------------------------------------------------------------------
# Transparent images
# ------------------------------------------------------------------------------

# The test images are 16x16, made of flat 8x8 quadrants, one JPEG block each:
# JPEG 95 keeps a flat block within a step or two.


def _quadrants(pixels):
  """(16, 16, C) image of four flat 8x8 quadrants: pixels[(row, col)] in
  {0, 8}^2 gives each one's value (C,).
  """
  channels = len(next(iter(pixels.values())))
  image = np.zeros((16, 16, channels), np.uint8)
  for (row, col), value in pixels.items():
    image[row : row + 8, col : col + 8] = value
  return image


def _quadrant(image, row, col):
  """The mean (3,) of an 8x8 quadrant of a prepared (16, 16, 3) image."""
  return image[row : row + 8, col : col + 8].reshape(-1, 3).mean(0)


def _rgba_image():
  """(16, 16, 4): red under alpha 0 (top left), (200, 100, 0) under alpha 128
  (bottom left), opaque (40, 90, 160) (top right) and (10, 20, 30) (bottom
  right).
  """
  return _quadrants(
    {
      (0, 0): (255, 0, 0, 0),
      (8, 0): (200, 100, 0, 128),
      (0, 8): (40, 90, 160, 255),
      (8, 8): (10, 20, 30, 255),
    }
  )


# round((c * 128 + b * 127) / 255) of (200, 100, 0) over a background b, by
# hand: white: (100.39 + 127, 50.20 + 127, 0 + 127) = (227, 177, 127);
# (0, 128, 255): (100.39 + 0, 50.20 + 63.75, 0 + 127) = (100, 114, 127).
BLENDED = {(255, 255, 255): (227, 177, 127), (0, 128, 255): (100, 114, 127)}


def test_flatten_composites_on_the_background():
  rgba = Image.fromarray(_rgba_image())
  for background, blended in BLENDED.items():
    flat = np.asarray(builders.flatten(rgba, background))
    assert flat.shape == (16, 16, 3) and flat.dtype == np.uint8
    np.testing.assert_array_equal(flat[0, 0], background)
    np.testing.assert_array_equal(flat[8, 0], blended)
    np.testing.assert_array_equal(flat[0, 8], (40, 90, 160))
    np.testing.assert_array_equal(flat[8, 8], (10, 20, 30))
  assert np.asarray(builders.flatten(rgba))[0, 0].tolist() == [255] * 3


def test_opaque_images_are_flattened_as_before():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
  opaque = np.concatenate([rgb, np.full((8, 12, 1), 255, np.uint8)], -1)
  for image in (
    Image.fromarray(rgb),
    Image.fromarray(rgb[..., 0]),  # L
    Image.fromarray(rgb).convert('P'),  # a palette without transparency
    Image.fromarray(opaque),  # RGBA, alpha 255 everywhere
  ):
    np.testing.assert_array_equal(
      np.asarray(builders.flatten(image, (0, 128, 255))),
      np.asarray(image.convert('RGB')),
      err_msg=image.mode,
    )


@pytest.mark.parametrize('background', [None, '0,128,255'])
def test_transparent_pixels_are_prepared_on_the_background(
  tmp_path, background
):
  _save(tmp_path / 'in' / 'rgba.png', _rgba_image())
  kwargs = {} if background is None else {'background': background}
  colour = (255, 255, 255) if background is None else (0, 128, 255)
  builder = preparation.prepare_image_folder(
    tmp_path / 'in', tmp_path / 'data', 16, 'rgba', **kwargs
  )
  assert builder.info.metadata['background'] == list(colour)
  (image,) = [
    r['image']
    for r in sources.load_source(tmp_path / 'data', 'image_folder/rgba')
  ]
  assert image.shape == (16, 16, 3)
  for (row, col), want in (
    ((0, 0), colour),  # the hidden red is gone
    ((8, 0), BLENDED[colour]),
    ((0, 8), (40, 90, 160)),
    ((8, 8), (10, 20, 30)),
  ):
    np.testing.assert_allclose(_quadrant(image, row, col), want, atol=2)
  # The same name with another background is another data set.
  with pytest.raises(ValueError, match='already holds .* on background'):
    preparation.prepare_image_folder(
      tmp_path / 'in', tmp_path / 'data', 16, 'rgba', background='black'
    )


def test_gray_alpha_and_transparent_palette_images(tmp_path):
  source = tmp_path / 'in'
  # LA: gray 50 under alpha 0 (left half) and 255 (right half).
  gray = _quadrants(
    {(r, c): (50, 255 * (c > 0)) for r in (0, 8) for c in (0, 8)}
  )
  _save(source / 'gray_alpha.png', gray)
  # P: index 0 (red, the transparent one) on the left, 1 (green) on the right.
  indices = np.zeros((16, 16), np.uint8)
  indices[:, 8:] = 1
  palette = Image.frombytes('P', (16, 16), indices.tobytes())
  palette.putpalette([255, 0, 0, 0, 255, 0])
  palette.save(source / 'palette.png', transparency=0)
  with Image.open(source / 'gray_alpha.png') as la:
    assert la.mode == 'LA'
  with Image.open(source / 'palette.png') as p:
    assert p.mode == 'P' and p.info['transparency'] == 0
  preparation.prepare_image_folder(
    source, tmp_path / 'data', 16, 'mixed', background='#000000'
  )
  data = sources.load_source(tmp_path / 'data', 'image_folder/mixed')
  gray_alpha, paletted = data[0]['image'], data[1]['image']  # sorted names
  assert gray_alpha.shape == paletted.shape == (16, 16, 3)
  np.testing.assert_allclose(gray_alpha[:, :8].mean((0, 1)), 0, atol=2)
  np.testing.assert_allclose(gray_alpha[:, 8:].mean((0, 1)), 50, atol=2)
  np.testing.assert_allclose(paletted[:, :8].mean((0, 1)), 0, atol=2)
  np.testing.assert_allclose(paletted[:, 8:].mean((0, 1)), (0, 255, 0), atol=2)


def test_background_forms_and_the_command_refusing_a_bad_one(tmp_path):
  parse = preparation.parse_background
  assert parse('white') == (255, 255, 255) and parse('Black') == (0, 0, 0)
  assert parse('0, 128,255') == (0, 128, 255) == parse('#0080FF')
  assert parse((1, 2, 3)) == (1, 2, 3)
  for bad in ('purple', '1,2', '0,0,256', '#12345', '1,2,x'):
    with pytest.raises(ValueError, match='must be white, black, R,G,B'):
      parse(bad)
  _save(tmp_path / 'in' / 'rgba.png', _rgba_image())
  result = support.run_python(
    '-m',
    'cips_jax.data',
    'folder',
    tmp_path / 'in',
    f'--data_dir={tmp_path / "data"}',
    '--resolution=8',
    '--background=purple',
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last == (
    'cips_jax.data: error: --background must be white, black, R,G,B (each '
    "0-255) or #rrggbb; got 'purple'"
  ), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'data').exists()


# ----------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------


def _encoded_images(n, height, width):
  """Images whose pixels state their own position: R = column, G = row, B =
  image index.
  """
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return [
    {
      'image': np.stack([cols, rows, np.full_like(rows, k)], -1).astype(
        np.uint8
      )
    }
    for k in range(n)
  ]


def _decode(image):
  """Source (column, row, image index) of every pixel of a float image in [-1,
  1].
  """
  values = np.round((image + 1.0) * 127.5).astype(int)
  return values[..., 0], values[..., 1], values[..., 2]


def _reference_patch(frame, scale, offsets, starts, crop):
  """The reference's multi-scale sampling, written from its description (not the
  module's).

  frame: (R, R, C) image + coords stack; offsets/starts: the strided offset and
    the window
  start per axis (for scale 0, `starts` is the window's corner and `offsets` is
  unused).
  """
  if scale == 0:
    return frame[starts[0] : starts[0] + crop, starts[1] : starts[1] + crop]
  stride = 2**scale
  strided = frame[offsets[0] :: stride, offsets[1] :: stride]
  return strided[starts[0] : starts[0] + crop, starts[1] : starts[1] + crop]


def _small_batches(source=None, **overrides):
  """Patches of 8 from 32x32 frames of twenty self-describing 40x48 images."""
  kwargs = dict(global_batch_size=8, resolution=32, crop=8, seed=3) | overrides
  return TrainBatches(
    _encoded_images(20, 40, 48) if source is None else source, **kwargs
  )


def test_batch_shapes_dtypes_and_range():
  batches = _small_batches()
  assert batches.n_scales == 3
  scales = set()
  for step in range(12):
    batch = batches.batch_at(step)
    assert set(batch) == {'image', 'coords', 'scale'}
    assert (
      batch['image'].shape == (8, 8, 8, 3)
      and batch['image'].dtype == np.float32
    )
    assert (
      batch['coords'].shape == (8, 8, 8, 2)
      and batch['coords'].dtype == np.float32
    )
    assert batch['scale'].shape == (8,) and batch['scale'].dtype == np.int32
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1
    assert batch['coords'].min() >= -1 and batch['coords'].max() <= 1
    assert len(set(batch['scale'])) == 1  # one scale for the whole batch
    scales.add(int(batch['scale'][0]))
  assert scales == {0, 1, 2}


def test_batches_are_a_pure_function_of_seed_and_step():
  a, b = _small_batches(), _small_batches()
  for step in (5, 0, 5, 123):  # any order, repeated, far ahead
    x, y = a.batch_at(step), b.batch_at(step)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a.batch_at(1)['image'], a.batch_at(2)['image'])
  assert not np.array_equal(
    a.batch_at(1)['image'], _small_batches(seed=4).batch_at(1)['image']
  )


def test_host_slices_make_up_the_global_batch():
  whole = _small_batches(flip=True)
  hosts = [
    _small_batches(flip=True, process_index=i, process_count=2)
    for i in range(2)
  ]
  for step in (0, 7):
    full, parts = whole.batch_at(step), [h.batch_at(step) for h in hosts]
    assert parts[0]['image'].shape[0] == 4
    for key in full:
      np.testing.assert_array_equal(
        np.concatenate([p[key] for p in parts]), full[key]
      )


def test_iterate_matches_batch_at():
  batches = _small_batches(process_index=1, process_count=2)
  stream = batches.iterate(start_step=4, num_threads=2)
  for step in range(4, 8):
    got, want = next(stream), batches.batch_at(step)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_every_epoch_is_a_permutation():
  batches = _small_batches(global_batch_size=4)  # 20 images: 5 steps per epoch
  for epoch in range(2):
    seen = [
      batches.record_index(step, row)
      for step in range(5 * epoch, 5 * epoch + 5)
      for row in range(4)
    ]
    assert sorted(seen) == list(range(20))
  first = [batches.record_index(s, r) for s in range(5) for r in range(4)]
  second = [batches.record_index(s, r) for s in range(5, 10) for r in range(4)]
  assert first != second  # reshuffled every epoch
  # The images really are the records: channel 2 holds the image index.
  step, batch = 6, batches.batch_at(6)
  assert [int(_decode(im)[2][0, 0]) for im in batch['image']] == [
    batches.record_index(step, row) for row in range(4)
  ]


@pytest.mark.parametrize('flip', [False, True])
def test_coordinates_travel_with_the_pixels(flip):
  """Patches of self-describing images: pixels and coordinates agree at every
  scale.
  """
  r, c = 32, 8
  batches = _small_batches(flip=flip, global_batch_size=16)
  grid = grids.uniform(r, r)
  first_cols = {s: set() for s in range(3)}
  n_flipped = 0
  for step in range(24):
    batch = batches.batch_at(step)
    scale = int(batch['scale'][0])
    stride = 2**scale
    for image, coords in zip(batch['image'], batch['coords']):
      src_cols, src_rows, _ = _decode(image)
      # Frame indices of the coordinates: they must be points of the R x R grid.
      frame_cols = np.round((coords[..., 0] + 1) * (r - 1) / 2).astype(int)
      frame_rows = np.round((coords[..., 1] + 1) * (r - 1) / 2).astype(int)
      top, left = frame_rows[0, 0], frame_cols[0, 0]
      # The independent reference: recover (offset, window start) from the patch
      # corner.
      offsets = (top % stride, left % stride) if scale else (0, 0)
      starts = ((top - offsets[0]) // stride, (left - offsets[1]) // stride)
      assert all(0 <= o < r - stride * c + stride for o in offsets)
      assert all(
        0 <= s <= -(-(r - o) // stride) - c for s, o in zip(starts, offsets)
      )
      expected = _reference_patch(np.asarray(grid), scale, offsets, starts, c)
      np.testing.assert_array_equal(coords, expected)
      # Pixels: a crop of the stored 40x48 image at one frame offset (row0,
      # col0); columns mirrored inside the frame when flipped.
      row0 = src_rows[0, 0] - top
      assert 0 <= row0 <= 40 - r
      np.testing.assert_array_equal(src_rows, row0 + frame_rows)
      mirrored = src_cols[0, 1] < src_cols[0, 0]
      n_flipped += mirrored
      pixel_frame_cols = (r - 1 - frame_cols) if mirrored else frame_cols
      col0 = src_cols[0, 0] - pixel_frame_cols[0, 0]
      assert 0 <= col0 <= 48 - r
      np.testing.assert_array_equal(src_cols, col0 + pixel_frame_cols)
      first_cols[scale].add(int(left))
  assert (n_flipped > 0) == flip
  # The windows reach the frame's borders: scale 0 from 0 to R - c, the coarsest
  # scale (stride R/c) starts at every phase 0 .. stride-1.
  assert {0, r - c} <= first_cols[0]
  assert first_cols[2] == {0, 1, 2, 3}


def test_flip_mirrors_half_the_pixels_and_never_the_coordinates():
  batches = _small_batches(crop=32, global_batch_size=64, flip=True)
  batch = batches.batch_at(0)
  np.testing.assert_array_equal(
    batch['coords'], np.broadcast_to(grids.uniform(32, 32), (64, 32, 32, 2))
  )
  src_cols = _decode(batch['image'])[0]
  flipped = src_cols[:, 0, 1] < src_cols[:, 0, 0]
  assert 16 <= flipped.sum() <= 48


def test_whole_images_with_the_training_grid(procedural_s32):
  batches = TrainBatches(
    procedural_s32, global_batch_size=4, resolution=32, flip=False, seed=0
  )
  batch = batches.batch_at(3)
  assert batches.n_scales == 1 and set(batch['scale']) == {0}
  np.testing.assert_array_equal(
    batch['coords'], np.broadcast_to(grids.uniform(32, 32), (4, 32, 32, 2))
  )
  np.testing.assert_array_equal(
    pipeline.coordinate_grid(32, 32), grids.uniform(32, 32)
  )
  for row in range(4):
    original = procedural.landscape(batches.record_index(3, row), 32, 32)
    np.testing.assert_allclose(
      batch['image'][row], original / 127.5 - 1, atol=1e-6
    )


def test_cylindrical_crops_wrap_around():
  r, width = 16, 40
  source = _encoded_images(6, r, width)
  batches = TrainBatches(
    source,
    global_batch_size=8,
    resolution=r,
    crop=8,
    flip=False,
    seed=1,
    cylindrical=True,
  )
  wrapped = 0
  for step in range(16):
    batch = batches.batch_at(step)
    assert batch['phase'].shape == (8,) and batch['phase'].dtype == np.float32
    scale = int(batch['scale'][0])
    for image, coords, phase in zip(
      batch['image'], batch['coords'], batch['phase']
    ):
      src_cols, src_rows, _ = _decode(image)
      col0 = int(round(phase * width))
      assert 0 <= col0 < width
      # x is the angle: [-1, 1) spans the panorama's W columns once, unwrapped
      # past the seam.
      unwrapped = np.round((coords[..., 0] + 1) * width / 2).astype(int)
      frame_cols = unwrapped - col0
      assert frame_cols.min() >= 0 and frame_cols.max() < r
      np.testing.assert_allclose(
        coords[..., 0], -1 + 2 * unwrapped / width, atol=1e-6
      )
      np.testing.assert_array_equal(src_cols, unwrapped % width)
      assert np.all(np.diff(unwrapped, axis=1) == 2**scale)
      np.testing.assert_array_equal(
        src_rows, np.round((coords[..., 1] + 1) * (r - 1) / 2).astype(int)
      )
      wrapped += bool(np.any(np.diff(src_cols, axis=1) < 0))
  assert wrapped > 0  # some crops cross the 360 degree seam


def test_invalid_settings_are_rejected():
  with pytest.raises(ValueError, match='power of 2'):
    _small_batches(crop=12, resolution=36)
  with pytest.raises(ValueError, match='divide'):
    _small_batches(crop=12)
  with pytest.raises(ValueError, match='multiple'):
    _small_batches(global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match='smaller than the training resolution'):
    _small_batches(source=_encoded_images(3, 24, 48)).batch_at(0)
