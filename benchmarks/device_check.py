"""The accelerator check: every figure of the GPU/TPU targets, as one JSON file.

    bash benchmarks/device_check.sh            # on a GPU or TPU, <= 8 minutes
    bash benchmarks/device_check.sh --smoke    # anywhere: tiny sizes, seconds

Figures (all from this one process, on the first device):
- `matmul`: 4096^3 products in bfloat16 and float32 (XLA's default precision,
  which is TF32 on NVIDIA GPUs, and 'highest'), TFLOP/s;
- `generation`: CIPSskip-256 at 256^2, batch 16 in bfloat16 and float32 and
  batch 64 in bfloat16, for every per-image style form (activations scaled
  around each product, the style folded into one weight per image, or the fused
  Pallas layer): images/s, useful TFLOP/s (3,401,344 MAC per pixel) and the
  fraction of the chip's dense bfloat16 peak;
- `style_ratios`: a 2-style mixture and a style per pixel against per-image
  styles (time), bfloat16, batch 16;
- `fused_layer`: one 512 -> 512 modulated layer over batch 16 x 256^2 pixels,
  the Pallas kernel (`cips_jax.kernels.modulated_dense`) against XLA's fusion
  of the same formula (compiled kernels on an accelerator only);
- `train`: the GAN step at 256^2 and 64^2, global batch 32, bfloat16, with and
  without remat: seconds of a plain step and of an R1 step, the step with R1
  amortised ((r1_every - 1) plain + 1 R1 per r1_every steps), images/s, peak
  device memory, and MFU = useful FLOPs / time / peak, where the useful FLOPs
  are XLA's cost analysis of the step without remat;
- `churches_projection`: GPU-days of the reference recipe (38.4M images) at the
  256^2 rate;
- `choices`: which per-image form 'auto' takes here, the fastest measured, and
  whether D convolves with im2col on this backend.

Time budget: `--budget_s` (default 420 s, so the whole run with start-up and
the JSON stays under 8 minutes on one H100 or H200). The cases run in order of
importance, each only if the budget left covers the slowest case of its kind
seen so far (compilation included); a case that does not fit is recorded under
`skipped`, and one that fails (a kernel that does not compile) records its
error instead of ending the run.
`--smoke` shrinks every case (a 32^2 model 16 wide, batches of 4, one training
case at 16^2 without remat, its R1 step timed for both) so the script runs on a
CPU in CI (about 25 s on 2 cores): its figures mean nothing.
"""

from __future__ import annotations

import datetime
import time

from absl import app
from absl import flags
import common
import jax
import jax.numpy as jnp
import numpy as np

from cips_jax import discriminator as discriminator_lib
from cips_jax import generator as generator_lib
from cips_jax import models
from cips_jax.kernels import modulated_dense

_SMOKE = flags.DEFINE_boolean(
  'smoke', False, 'tiny sizes, on any backend (figures meaningless)'
)
_OUT = flags.DEFINE_string('out', None, 'the JSON file (default: stdout only)')
_BUDGET = flags.DEFINE_float(
  'budget_s', 420.0, 'seconds the measurements may take (see the docstring)'
)


class Budget:
  """Runs cases while time is left; remembers what was skipped."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds
    self.slowest: dict[str, float] = {}
    self.skipped: list[str] = []

  def run(self, kind: str, name: str, case):
    """case() if the slowest `kind` so far still fits; None otherwise."""
    left = self.deadline - time.perf_counter()
    if self.slowest.get(kind, 0.0) > left:
      self.skipped.append(name)
      return None
    start = time.perf_counter()
    try:
      return case()
    except Exception as error:  # a failure is a measurement here
      return {'name': name, 'failed': f'{type(error).__name__}: {error}'[:400]}
    finally:
      took = time.perf_counter() - start
      self.slowest[kind] = max(self.slowest.get(kind, 0.0), took)


# Dense bfloat16 peaks (TFLOP/s) by jax device_kind, from the vendors' sheets.
PEAK_BF16_TFLOPS = {
  'NVIDIA H200': 989.0,
  'NVIDIA H100 80GB HBM3': 989.0,
  'NVIDIA A100-SXM4-80GB': 312.0,
  'TPU v4': 275.0,
  'TPU v5 lite': 197.0,
}
CHURCHES_IMAGES = 1_200_000 * 32  # the reference recipe: steps x batch


def peak_tflops(device) -> float | None:
  """The device's dense bfloat16 peak, when this file knows it."""
  return PEAK_BF16_TFLOPS.get(device.device_kind)


# Every exact per-image form: activations, weights, fused.
FORMS = generator_lib.PER_IMAGE_FORMS[:3]


def generation_cases(smoke: bool, peak: float | None, budget: Budget):
  """Per-image renders by batch, dtype and form; the other forms' ratios."""
  gen32 = models.CIPSskip(**common.SMOKE_MODEL) if smoke else models.CIPSskip()
  variables = models.init(gen32, jax.random.key(0))
  side = common.SMOKE_SIDE if smoke else 256
  first = 4 if smoke else 16
  # float32 at the first batch only: each case is a compilation.
  plan = [(first, jnp.bfloat16), (first, jnp.float32)]
  if not smoke:
    plan.append((64, jnp.bfloat16))
  cases = []
  for batch, dtype in plan:
    for form in FORMS:
      gen = gen32.clone(dtype=dtype, per_image_form=form)
      name = f'generation {form} {jnp.dtype(dtype).name} batch {batch}'

      def measure(gen=gen, batch=batch, dtype=dtype):
        case = common.generator_case(
          gen, variables, 'per_image', batch, side, 1, np.inf
        )
        case.pop('fraction_of_matmul')
        case['precision'] = 'bfloat16' if dtype == jnp.bfloat16 else 'default'
        case['tflop_per_s'] = round(case.pop('gflop_per_s') / 1e3, 2)
        if peak:
          case['fraction_of_peak_bf16'] = round(case['tflop_per_s'] / peak, 4)
        return case

      case = budget.run('generation', name, measure)
      if case is not None:
        cases.append(case)
  batches = (first,)
  gen16 = gen32.clone(dtype=jnp.bfloat16)
  base = next(
    c
    for c in cases
    if (c.get('batch'), c.get('dtype'), c.get('form'))
    == (batches[0], 'bfloat16', generator_lib.MODULATED_ACTIVATIONS)
  )
  ratios = {}
  for kind in ('mixture2', 'per_pixel'):
    case = budget.run(
      'generation',
      f'style ratio {kind}',
      lambda kind=kind: common.generator_case(
        gen16, variables, kind, batches[0], side, 1, np.inf
      ),
    )
    if case is not None and 'seconds' in case:
      ratios[f'{kind}_vs_per_image_time'] = round(
        case['seconds'] / base['seconds'], 3
      )
  return cases, ratios


def fused_layer_case(smoke: bool):
  """One modulated layer, fused by Pallas vs by XLA, bfloat16."""
  batch, pixels, width = (2, 256, 32) if smoke else (16, 256 * 256, 512)
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (batch, pixels, width)).astype(jnp.bfloat16)
  kernel = jax.random.normal(keys[1], (width, width)) / np.sqrt(width)
  scale = 1 + 0.1 * jax.random.normal(keys[2], (batch, width))
  inv_norm = jnp.ones((batch, width))
  bias = jnp.zeros((width,))
  args = (x, kernel, scale, inv_norm, bias)
  xla = jax.jit(modulated_dense.styled_dense_reference)
  result = {
    'shape': [batch, pixels, width, width],
    'xla_seconds': round(common.best_time(xla, *args, repeats=3), 5),
  }
  if jax.default_backend() == 'cpu':
    result['pallas'] = 'interpret mode only on CPU: not timed'
    return result
  try:
    fused = jax.jit(modulated_dense.fused_styled_dense)
    result['pallas_seconds'] = round(
      common.best_time(fused, *args, repeats=3), 5
    )
    result['pallas_vs_xla_time'] = round(
      result['pallas_seconds'] / result['xla_seconds'], 3
    )
  except Exception as error:  # a compile failure is a result here
    result['pallas'] = f'failed: {type(error).__name__}: {str(error)[:300]}'
  return result


def peak_device_bytes() -> int | None:
  """The first device's peak memory in use so far, where it reports one."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def train_case(side, batch, remat, smoke, peak, useful_flops=None):
  """One training configuration: a plain step and an R1 step, timed."""
  config = common.train_config(side, batch, remat, 'bfloat16', smoke)
  state, steps, batch_arrays = common.prepared_steps(config)
  flops, seconds = {}, {}
  # Smoke: the R1 step only (one program to compile) stands in for both.
  for with_r1 in (True,) if smoke else (False, True):
    compiled = steps[with_r1].lower(state, batch_arrays).compile()
    flops[with_r1] = compiled.cost_analysis().get('flops', float('nan'))
    # Timed as compiled here: calling the jitted step would compile it again.
    seconds[with_r1], state = common.best_step_time(
      compiled, state, batch_arrays, 1 if smoke else 3
    )
  if smoke:
    flops[False], seconds[False] = flops[True], seconds[True]
  every = config.train.r1_every
  amortised = ((every - 1) * seconds[False] + seconds[True]) / every
  flops_amortised = ((every - 1) * flops[False] + flops[True]) / every
  # MFU counts the FLOPs of the step without remat (remat's recomputation is
  # not useful work): the caller passes them for the remat case.
  useful = flops_amortised if useful_flops is None else useful_flops
  case = {
    'side': side,
    'global_batch': batch,
    'compute_dtype': 'bfloat16',
    'remat': remat,
    'seconds_plain_step': round(seconds[False], 4),
    'seconds_r1_step': round(seconds[True], 4),
    'seconds_amortised': round(amortised, 4),
    'images_per_s': round(batch / amortised, 2),
    'xla_tflop_per_step_amortised': round(flops_amortised / 1e12, 4),
    'useful_tflop_per_step': round(useful / 1e12, 4),
    'peak_device_mib': None
    if peak_device_bytes() is None
    else round(peak_device_bytes() / 2**20, 1),
  }
  if peak:
    case['mfu'] = round(useful / amortised / (peak * 1e12), 4)
  return case, useful


def main(argv):
  common.check_no_arguments(argv)
  smoke = _SMOKE.value
  if jax.default_backend() == 'cpu' and not smoke:
    raise SystemExit(
      'device_check: no accelerator visible to jax (use --smoke to run the '
      'script on a CPU)'
    )
  start = time.perf_counter()
  device = jax.devices()[0]
  peak = peak_tflops(device)
  n = 256 if smoke else 4096
  highest = jax.lax.Precision.HIGHEST
  matmul = {
    'bfloat16': common.matmul_gflops(n, jnp.bfloat16) / 1e3,
    'float32_default': common.matmul_gflops(n, jnp.float32) / 1e3,
    'float32_highest': common.matmul_gflops(n, jnp.float32, highest) / 1e3,
  }
  budget = Budget(_BUDGET.value)
  generation, ratios = generation_cases(smoke, peak, budget)
  fused = budget.run('layer', 'fused layer', lambda: fused_layer_case(smoke))
  training = []
  if smoke:  # one small case: the code path, in seconds
    training.append(train_case(16, 4, False, True, peak)[0])
  for side, batch in () if smoke else ((256, 32), (64, 32)):
    plain = budget.run(
      'train',
      f'train {side} plain',
      lambda side=side, batch=batch: train_case(
        side, batch, False, False, peak
      ),
    )
    if plain is None or 'failed' in plain:
      training.append(plain or {'name': f'train {side} plain', 'skipped': True})
      continue
    plain, useful = plain
    with_remat = budget.run(
      'train',
      f'train {side} remat',
      lambda side=side, batch=batch, useful=useful: train_case(
        side, batch, True, False, peak, useful
      )[0],
    )
    training += [plain] + ([with_remat] if with_remat else [])
  at_256 = training[0]
  measured = [c for c in generation if c.get('dtype') == 'bfloat16']
  fastest = min(measured, key=lambda c: c['seconds'] / c['batch'])
  report = {
    'benchmark': 'device_check',
    'smoke': smoke,
    'date': datetime.date.today().isoformat(),
    'machine': common.machine(
      'backend', 'device_kind', 'device_count', 'processor', 'jax'
    ),
    'peak_bf16_tflop_per_s': peak,
    'matmul_tflop_per_s': {k: round(v, 2) for k, v in matmul.items()},
    'generation_256': generation,
    'style_ratios': ratios,
    'fused_layer': fused,
    'train': training,
    'churches_projection': {
      'images': CHURCHES_IMAGES,
      'images_per_s': at_256.get('images_per_s'),
      'gpu_days': round(CHURCHES_IMAGES / at_256['images_per_s'] / 86400, 2)
      if at_256.get('images_per_s')
      else None,
    },
    'choices': {
      'per_image_form_auto': generator_lib.resolve_per_image_form('auto'),
      'per_image_form_fastest_bf16': fastest['form'],
      'discriminator_conv': discriminator_lib.resolve_conv_impl('auto'),
    },
    'useful_mac_per_pixel': common.MAC_PER_PIXEL,
    'budget_s': _BUDGET.value,
    'skipped': budget.skipped,
    'seconds_total': round(time.perf_counter() - start, 1),
  }
  common.print_json(report, out=_OUT.value)


if __name__ == '__main__':
  app.run(main)
