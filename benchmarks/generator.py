"""Generator speed and memory, printed as JSON.

CIPSskip-256 rendering a 256x256 grid.

    # the full set (about 5 min on 2 CPU cores)
    python benchmarks/generator.py
    # batch 1 only, fewer repeats
    python benchmarks/generator.py --quick
    # chosen batch sizes (a comma-separated list, as absl writes lists)
    python benchmarks/generator.py --batch_sizes=1,4 --repeats=1

Cases (all at `--resolution`, default 256):
- `per_image`: one w per image (float32 and bfloat16 matmul inputs), for each
  batch size and each per-image style form (`--forms`: the activations scaled
  around each product, or the style folded into one weight per image);
- `mixture2`: a soft left-right blend of two styles per image (`ws` (B, 2, D) +
  `mix`);
- `per_pixel`: an arbitrary w in every pixel (`w` (B, H, W, D)).
For each: seconds per call (best of `--repeats`, after compilation), images/s,
achieved GFLOP/s counting 2 x 222.9 GMAC of useful work per 256^2 image
(3,401,344 MAC per pixel), the fraction of the measured matmul rate, the
multiply-accumulates per pixel the style form really needs
(`mac_per_pixel_done`: a per-pixel style adds its affines and demodulations),
and peak memory as XLA's buffer assignment reports it (arguments + outputs +
temporaries). The matmul rate is a 4096x4096 float32 `jnp.dot` timed in the same
run, so every ratio compares numbers from one process on one machine.
"""

from __future__ import annotations

from absl import app
from absl import flags
import common
import jax
import jax.numpy as jnp

from cips_jax import generator as generator_lib
from cips_jax import host_malloc
from cips_jax import models

# the per-image style forms one can choose ('auto' picks one of them)
_FORM_CHOICES = generator_lib.PER_IMAGE_FORMS[:2]

_RESOLUTION = flags.DEFINE_integer('resolution', 256, 'the grid side')
_BATCH_SIZES = flags.DEFINE_list(
  'batch_sizes', ['1', '4'], 'batch sizes, comma separated'
)
_REPEATS = flags.DEFINE_integer('repeats', 2, 'timed calls per case (best)')
_QUICK = flags.DEFINE_boolean('quick', False, 'batch 1, one repeat')
_FORMS = flags.DEFINE_list(
  'forms',
  list(_FORM_CHOICES),
  f'per-image style forms, comma separated, of {", ".join(_FORM_CHOICES)}',
)
flags.register_validator(
  'batch_sizes',
  lambda sizes: bool(sizes) and all(s.isdigit() and int(s) > 0 for s in sizes),
  'batch sizes are positive integers',
)
flags.register_validator(
  'forms',
  lambda forms: bool(forms) and set(forms) <= set(_FORM_CHOICES),
  f'forms are among {", ".join(_FORM_CHOICES)}',
)


def main(argv):
  common.check_no_arguments(argv)
  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  repeats = _REPEATS.value
  if _QUICK.value:
    batch_sizes, repeats = [1], 1
  resolution = _RESOLUTION.value

  matmul_rate = common.matmul_gflops()
  gen32 = models.CIPSskip(per_image_form=generator_lib.MODULATED_ACTIVATIONS)
  variables = models.init(gen32, jax.random.key(0))
  cases = []
  for batch in batch_sizes:
    for dtype in (jnp.float32, jnp.bfloat16):
      for form in _FORMS.value:
        cases.append(
          common.generator_case(
            gen32.clone(dtype=dtype, per_image_form=form),
            variables,
            'per_image',
            batch,
            resolution,
            repeats,
            matmul_rate,
          )
        )
  biggest = max(batch_sizes)
  for kind in ('mixture2', 'per_pixel'):
    cases.append(
      common.generator_case(
        gen32, variables, kind, biggest, resolution, repeats, matmul_rate
      )
    )

  base = next(
    c
    for c in cases
    if c['style'] == 'per_image'
    and c['form'] == generator_lib.MODULATED_ACTIVATIONS
    and c['dtype'] == 'float32'
    and c['batch'] == biggest
  )
  forms = {
    f'{c["dtype"]}_batch{c["batch"]}': round(
      c['seconds']
      / next(
        a['seconds']
        for a in cases
        if a['style'] == 'per_image'
        and a['form'] == generator_lib.MODULATED_ACTIVATIONS
        and (a['dtype'], a['batch']) == (c['dtype'], c['batch'])
      ),
      3,
    )
    for c in cases
    if c['style'] == 'per_image' and c['form'] == generator_lib.FOLDED_WEIGHTS
  }
  ratios = {
    f'{c["style"]}_vs_per_image': {
      'time': round(c['seconds'] / base['seconds'], 3),
      'peak_memory': round(c['peak_mib'] / base['peak_mib'], 3),
      'arithmetic': round(
        c['mac_per_pixel_done'] / base['mac_per_pixel_done'], 3
      ),
    }
    for c in cases
    if c['style'] != 'per_image'
  }
  common.print_json(
    {
      'benchmark': 'generator',
      'model': 'CIPSskip-256',
      'machine': common.machine(
        'backend', 'devices', 'processor', 'jax', 'host_malloc_reuse'
      ),
      'matmul_4096_f32_gflop_per_s': round(matmul_rate, 2),
      'cases': cases,
      'ratios_at_batch_%d' % biggest: ratios,
      # time of the folded-weight form / the activation form, per case
      'weights_vs_activations_time': forms,
    }
  )


if __name__ == '__main__':
  # before the first computation starts XLA's threads
  host_malloc.reuse_freed_memory()
  app.run(main)
