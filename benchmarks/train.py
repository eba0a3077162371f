"""Training-step speed, printed as JSON.

The full GAN step: D step + G step + EMA, no R1.

    # CIPSskip 64x64 batch 8 full width, and quickstart
    python benchmarks/train.py
    # the quickstart config only
    python benchmarks/train.py --quick

Cases:
- `cips_skip_64_full`: CIPSskip(size=64) at the reference's widths (512
  channels, hidden 512, style 512), Discriminator(size=64), 64x64 images, global
  batch 8, float32. The reference PyTorch code takes 46 s per such step on the
  project's 2-core CPU machine; that step does about 2.9 TFLOP of useful work
  (D's 3x3 convolutions ~33 GFLOP and G ~26 GFLOP per image per forward pass).
- `quickstart`: experiments/quickstart.py as configured.
For each: seconds per step (best of `--repeats` after compiling), steps/s,
images/s, XLA's own FLOP count of the step, and useful FLOP/s as a fraction of a
4096x4096 float32 `jnp.dot` timed in the same run. Options:
--compute_dtype=bfloat16, --remat.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import common

from cips_jax import host_malloc

_REPEATS = flags.DEFINE_integer(
  'repeats', 2, 'timed steps per case (best); quickstart gets at least 5'
)
_QUICK = flags.DEFINE_boolean('quick', False, 'the quickstart config only')
_COMPUTE_DTYPE = flags.DEFINE_string(
  'compute_dtype', 'float32', 'config.train.compute_dtype of every case'
)
_REMAT = flags.DEFINE_boolean(
  'remat', False, 'config.train.remat of every case'
)


def main(argv):
  common.check_no_arguments(argv)
  matmul_rate = common.matmul_gflops()
  cases = []
  if not _QUICK.value:
    config = common.train_config(
      64, 8, remat=_REMAT.value, compute_dtype=_COMPUTE_DTYPE.value
    )
    cases.append(
      common.train_step_case(
        'cips_skip_64_full',
        config,
        _REPEATS.value,
        matmul_rate,
        common.USEFUL_TFLOP_64,
      )
    )
  config = common.load_config(
    os.path.join(common.REPO, 'experiments', 'quickstart.py')
  )
  config.train.compute_dtype = _COMPUTE_DTYPE.value
  config.train.remat = _REMAT.value
  cases.append(
    common.train_step_case(
      'quickstart', config, max(_REPEATS.value, 5), matmul_rate
    )
  )
  common.print_json(
    {
      'benchmark': 'train_step',
      'machine': common.machine(
        'backend', 'devices', 'processor', 'jax', 'host_malloc_reuse'
      ),
      'matmul_4096_f32_gflop_per_s': round(matmul_rate, 2),
      # The largest resident size of the process so far (over all cases run
      # before it).
      'process_max_rss_mib': round(common.peak_rss_mib()),
      'cases': cases,
    }
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  app.run(main)
