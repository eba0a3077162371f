"""How visible is the seam of a 360-degree panorama?

A seamless panorama's wrap-around step (from its last column back to its first)
should look like any other step between neighbouring columns. `panorama_seam`
compares the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cips_jax import errors


def panorama_seam(panorama: Any) -> dict[str, float]:
  """Column-step statistics of a panorama whose columns wrap.

  The panorama is (H, W, C), float or uint8.

  Returns:
    seam: mean absolute difference between the last and the first column;
    column_step_mean / _median / _max: the same for the W - 1 interior column
      pairs;
    seam_percentile: the percentage of interior steps smaller than the seam (a
      seam no more visible than other column boundaries sits well below 100);
    seam_ratio: seam / column_step_mean.
  """
  # float64 before differencing: uint8 differences would wrap around.
  x = np.asarray(panorama, np.float64)
  if x.ndim != 3 or x.shape[1] < 3:
    raise errors.InputError(
      f'expected a panorama (H, W, C) with W >= 3, got shape {x.shape}'
    )
  # One figure per interior column boundary, averaged over rows and channels.
  steps = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))
  # The wrap-around boundary, measured the same way.
  seam = float(np.abs(x[:, 0] - x[:, -1]).mean())
  return {
    'seam': seam,
    'column_step_mean': float(steps.mean()),
    'column_step_median': float(np.median(steps)),
    'column_step_max': float(steps.max()),
    'seam_percentile': float(100.0 * np.mean(steps < seam)),
    'seam_ratio': seam / float(steps.mean())
    if steps.mean() > 0
    else float('nan'),
  }
