"""`sampling.render` on one device and with each chunk split over all devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/render_on_devices.py

Prints a JSON line: the device count and, for per-image styles and a two-style
mixture, the largest absolute difference between the two renders.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from cips_jax import grids
from cips_jax import parallel
from cips_jax import sampling

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import tiny_generator  # noqa: E402

gen, variables = tiny_generator()
z = jax.random.normal(jax.random.PRNGKey(1), (2, 32))
w = sampling.mapping(gen, variables, z)
mix = np.random.default_rng(0).dirichlet(np.ones(2), size=(1, 30, 30))
mix = mix.astype(np.float32)
coords = grids.uniform(30, 30)
mesh = parallel.make_mesh()
results = {}
for name, kwargs in {
  'per_image': dict(w=w),
  'mixture': dict(w=w[None], mix=mix),
}.items():
  one = sampling.render(gen, variables, coords=coords, chunk_size=300, **kwargs)
  eight = sampling.render(
    gen, variables, coords=coords, chunk_size=300, mesh=mesh, **kwargs
  )
  results[name] = float(np.abs(one - eight).max())
print(json.dumps({'devices': mesh.size, 'max_abs_diff': results}))
