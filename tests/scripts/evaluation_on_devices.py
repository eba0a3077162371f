"""Inception features and evaluation renders on one device and on all devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/evaluation_on_devices.py

Prints a JSON line: the device count, the largest relative difference of the
features and the largest difference between the uint8 renders of the two meshes.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from cips_jax import evaluation
from cips_jax import grids
from cips_jax import parallel
from cips_jax.data import procedural
from cips_jax.metrics import inception

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import tiny_generator  # noqa: E402

mesh = parallel.make_mesh()
one = parallel.make_mesh(jax.devices()[:1])
images = np.stack([procedural.landscape(seed, 32, 32) for seed in range(8)])
params = inception.load_params()
eight = inception.InceptionFeatures(params, batch_size=8, mesh=mesh)(images)
single = inception.InceptionFeatures(params, batch_size=8)(images)
gen, variables = tiny_generator()
coords = np.asarray(grids.uniform(16, 16))


def fakes(m):
  e = evaluation.Evaluator(
    extractor=None,
    real=None,
    real_features=None,
    coords=coords,
    mesh=m,
    batch_size=16,
  )
  return np.concatenate(list(e.fake_batches(gen, variables['params'], 20)))


print(
  json.dumps(
    {
      'devices': mesh.size,
      'features_rel': float(
        np.abs(eight - single).max() / np.abs(single).max()
      ),
      'renders_abs': int(np.abs(fakes(mesh).astype(int) - fakes(one)).max()),
    }
  )
)
