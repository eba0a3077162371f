"""Prepares the training data sets (ArrayRecord, read by `cips_jax.data.load_source`).

    python -m cips_jax.data procedural --data_dir DATA_DIR --config s32
    python -m cips_jax.data folder SOURCE_DIR --data_dir DATA_DIR --resolution 256 [--name N]
    python -m cips_jax.data lsun --data_dir DATA_DIR          # needs TensorFlow to prepare
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m cips_jax.data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  proc = commands.add_parser('procedural', help='procedural landscapes (no download)')
  proc.add_argument('--config', default='s32', choices=['s32', 's64', 's256', 'panorama_s64'])
  folder = commands.add_parser('folder', help='a folder of JPEG/PNG/WebP images')
  folder.add_argument('source_dir')
  folder.add_argument('--resolution', type=int, required=True, help='shorter side in pixels')
  folder.add_argument('--name', default=None, help='default: <folder name>_<resolution>')
  folder.add_argument('--num_threads', type=int, default=None)
  lsun = commands.add_parser('lsun', help='LSUN church_outdoor (tfds catalog; needs TF)')
  lsun.add_argument('--download_dir', default=None)
  for sub in (proc, folder, lsun):
    sub.add_argument('--data_dir', required=True, help='root of the prepared data sets')
  args = parser.parse_args(argv)

  if args.command == 'folder' and not os.path.isdir(args.source_dir):
    print(f'error: image folder {args.source_dir} does not exist', file=sys.stderr)
    return 1
  from cips_jax.data import builders  # imports tensorflow_datasets: after parsing
  try:
    if args.command == 'procedural':
      builder = builders.prepare_procedural(args.data_dir, args.config)
    elif args.command == 'folder':
      builder = builders.prepare_image_folder(args.source_dir, args.data_dir, args.resolution,
                                              args.name, num_threads=args.num_threads)
    else:
      builder = builders.prepare_lsun_churches(args.data_dir, download_dir=args.download_dir)
  except (ImportError, OSError, ValueError) as error:
    # A missing extra, folder or bad value: the message says what to do; no traceback.
    print(f'error: {error}', file=sys.stderr)
    return 1
  if args.command == 'folder':
    skipped = builder.info.metadata.get('skipped_files', [])
    if skipped:
      print(f'skipped {len(skipped)} unreadable file(s): {", ".join(skipped)}', file=sys.stderr)
  print(f'prepared {builder.info.full_name} in {builder.data_dir}: '
        f'{builder.info.splits["train"].num_examples} train images')
  return 0


if __name__ == '__main__':
  sys.exit(main())
