"""Every accelerator program lowers for GPUs ('cuda') and TPUs ('tpu') on this
CPU, with the properties a device needs: no host callbacks, no float64,
bfloat16 products with float32 sums in bfloat16 programs, batches split over
the data axis, the train state donated, Pallas kernels built as Triton and as
Mosaic. Choices made per backend follow the platform a program is lowered for.

The programs are lowered once, by tests/scripts/lower_for_accelerators.py on 8
simulated devices (lowering only, no compilation).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cips_jax import generator as generator_lib
from cips_jax import grids
from cips_jax import models
from cips_jax import parallel
from cips_jax import platforms
from cips_jax import sampling
import lowering
import support

# Lowering for other platforms from this CPU: every choice staged, as a user's
# export sees it (conftest pins the other modules' tests to the CPU's).
pytestmark = pytest.mark.staged_choices

PLATFORMS = ('cuda', 'tpu')
KERNEL_CALL = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}
BATCH_SPLIT = '[{"data"}, {}, {}, {}]'


@pytest.fixture(scope='module')
def lowered(tmp_path_factory):
  out = tmp_path_factory.mktemp('lowered') / 'report.json'
  result = support.run_python(
    support.TESTS / 'scripts' / 'lower_for_accelerators.py',
    out,
    env=support.environment_with_devices(8),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['devices'] == 8
  return {k: v for k, v in report.items() if isinstance(v, dict)}


def programs(report, prefix=''):
  """(name, platform, properties) of every program lowered."""
  return [
    (name, platform, found)
    for name, by_platform in report.items()
    if name.startswith(prefix)
    for platform, found in by_platform.items()
    if platform in PLATFORMS
  ]


def test_every_program_lowers_for_both_platforms(lowered):
  names = set(lowered)
  for expected in (
    'train_step_float32',
    'train_step_bfloat16_r1',
    'generate_activations_bfloat16',
    'generate_weights_float32',
    'generate_fused_bfloat16',
    'render_chunk',
    'inception_features',
    'fused_1024_512_bfloat16',
    'fused_128_3_float32',
  ):
    assert expected in names
  failed = {
    f'{name} on {platform}': found['error']
    for name, platform, found in programs(lowered)
    if 'error' in found
  }
  assert not failed
  assert {p for _, p, _ in programs(lowered)} == set(PLATFORMS)


def test_no_host_callback_and_no_float64(lowered):
  for name, platform, found in programs(lowered):
    assert found['host_callbacks'] == [], (name, platform)
    assert not found['float64'], (name, platform)


def test_bfloat16_programs_multiply_bfloat16_and_sum_in_float32(lowered):
  bf16 = [p for p in programs(lowered) if 'bfloat16' in p[0]]
  assert len(bf16) >= 8 * len(PLATFORMS)
  for name, platform, found in bf16:
    assert found['bf16_violations'] == [], (name, platform)
  for name, platform, found in programs(lowered, 'train_step_bfloat16'):
    # D's forward convolutions in bfloat16; its backward ones take float32
    # operands (the stated exception, docs/training.md "Accelerators").
    assert found['forward_convolution_dtypes'] == ['bf16xbf16']
    assert found['f32_backward_convolutions'] > 0
  # float32 programs stay float32.
  for name, platform, found in programs(lowered, 'train_step_float32'):
    assert found['dtypes'] == ['f32'], (name, platform)


def test_training_steps_split_the_batch_and_donate_the_state(lowered):
  steps = programs(lowered, 'train_step')
  assert len(steps) == 2 * len(PLATFORMS)
  for name, platform, found in steps:
    leaves = lowered[name]['state_leaves']
    assert found['inputs'] == leaves + 2  # the state, then image and coords
    shardings = found['argument_shardings']
    assert shardings[-2:] == [BATCH_SPLIT, BATCH_SPLIT], (name, platform)
    assert not any('"data"' in s for s in shardings[:-2])  # replicated
    assert found['donated'] == leaves, (name, platform)


def test_inception_splits_its_batch(lowered):
  for name, platform, found in programs(lowered, 'inception_features'):
    assert found['argument_shardings'][-1] == BATCH_SPLIT
    assert found['convolutions'] > 90  # the whole network is there


def test_fused_programs_build_triton_and_mosaic_kernels(lowered):
  fused = programs(lowered, 'generate_fused') + programs(lowered, 'fused_')
  assert len(fused) >= 12
  for name, platform, found in fused:
    assert KERNEL_CALL[platform] in found['custom_calls'], (name, platform)
  for name, platform, found in programs(lowered, 'generate_activations'):
    assert not any(c in found['custom_calls'] for c in KERNEL_CALL.values())


def lowered_text(fn, platform, *args) -> str:
  disabled = [
    jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  ]
  exported = jax.export.export(
    jax.jit(fn), platforms=[platform], disabled_checks=disabled
  )(*args)
  return exported.mlir_module()


def test_the_checks_catch_a_float64_and_a_host_callback():
  x = jnp.ones((4,))

  def with_callback(x):
    jax.debug.callback(lambda v: None, x)
    return x * 2

  # jax.export refuses host callbacks outright (so a program with one fails
  # the lowering test above); the check reads one in a plain CPU lowering.
  with pytest.raises((NotImplementedError, ValueError)):
    lowered_text(with_callback, 'cuda', x)
  assert lowering.host_callbacks(jax.jit(with_callback).lower(x).as_text())
  with jax.enable_x64(True):
    wide = lowered_text(lambda x: x.astype(jnp.float64) * 2, 'cuda', x)
  assert lowering.has_float64(wide)
  clean = lowered_text(lambda x: x * 2, 'cuda', x)
  assert not lowering.host_callbacks(clean) and not lowering.has_float64(clean)
  # A bfloat16 program with a float32 product of note is flagged.
  a = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
  mixed = lowering.products(lowered_text(lambda a: (a @ a) @ a, 'tpu', a))
  assert lowering.bf16_violations(mixed)


def test_discriminator_convolutions_follow_the_lowering_platform():
  disc = models.Discriminator(size=8, channel_multiplier=1, max_channels=8)
  variables = jax.eval_shape(lambda: models.init(disc, jax.random.PRNGKey(0)))
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)

  def logits(variables, images):
    return disc.apply(variables, images)

  convolutions = {
    platform: lowering.summary(
      lowered_text(logits, platform, variables, images)
    )['convolutions']
    for platform in ('cpu', 'cuda', 'tpu')
  }
  # im2col (products only) on CPUs, XLA's convolutions on accelerators.
  assert convolutions['cpu'] == 0
  assert convolutions['cuda'] > 0 and convolutions['tpu'] > 0


def test_a_program_jitted_over_a_mesh_traces_only_its_platforms_choice():
  disc = models.Discriminator(size=8, channel_multiplier=1, max_channels=8)
  variables = jax.eval_shape(lambda: models.init(disc, jax.random.PRNGKey(0)))
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  mesh = parallel.make_mesh()
  traced = []

  def logits(variables, images):
    with parallel.tracing_over(mesh):
      return disc.apply(variables, images)

  def staged_choices(fn):
    jax.clear_caches()
    jaxpr = str(jax.make_jaxpr(fn)(variables, images))
    return jaxpr.count('platform_index')

  # Over this CPU's devices: the CPU's im2col only, nothing staged.
  assert staged_choices(logits) == 0
  text = lowered_text(logits, 'cpu', variables, images)
  assert lowering.summary(text)['convolutions'] == 0
  # An export for several platforms stages every choice out again; one for
  # another platform makes its choice.
  with platforms.exporting_for():
    assert staged_choices(logits) > 0
  with platforms.exporting_for('tpu'):
    assert staged_choices(logits) == 0
    text = lowered_text(logits, 'tpu', variables, images)
  assert lowering.summary(text)['convolutions'] > 0
  # The pin follows the named backend, whatever the tracing machine is.
  with platforms.pinned_to('tpu'):
    traced.append(staged_choices(lambda v, x: disc.apply(v, x)))
    text = lowered_text(lambda v, x: disc.apply(v, x), 'tpu', variables, images)
  assert traced == [0] and lowering.summary(text)['convolutions'] > 0
  for context in (platforms.pinned_to, platforms.exporting_for):
    with pytest.raises(ValueError, match='backend must be one of'):
      with context('metal'):
        pass
  # A builder for its own devices pins where the choices name its backend,
  # and leaves them staged on a platform they do not name.
  apply = lambda v, x: disc.apply(v, x)  # noqa: E731
  with platforms.built_for('tpu'):
    assert staged_choices(apply) == 0
  with platforms.built_for('metal'):
    assert staged_choices(apply) > 0


def test_the_generators_auto_form_follows_the_lowering_platform(monkeypatch):
  # Were GPUs measured to prefer folded weights, a program lowered here for
  # 'cuda' would carry them while the CPU's keeps modulated activations.
  monkeypatch.setitem(
    generator_lib.PER_IMAGE_FORM_BY_BACKEND, 'gpu', generator_lib.FOLDED_WEIGHTS
  )
  gen = models.CIPSskip(
    size=8, hidden_size=16, style_dim=16, n_mlp=1, max_channels=16
  )
  variables = jax.eval_shape(lambda: models.init(gen, jax.random.PRNGKey(0)))
  z = jax.ShapeDtypeStruct((2, 16), jnp.float32)
  coords = np.asarray(grids.uniform(8, 8))

  def generate(variables, z):
    return sampling.generate(gen, variables, z, coords)

  def batched_products(platform):
    # Folded weights: one (P, in) x (in, out) product per image, a batched dot.
    # Without clearing, jax would reuse sampling's traces, made with the
    # choices of their time.
    jax.clear_caches()
    text = lowered_text(generate, platform, variables, z)
    return text.count('batching_dims = [0] x [0]')

  assert batched_products('cuda') > 0
  assert batched_products('cpu') == 0
  assert batched_products('tpu') > 0  # TPUs fold (docs/tpu_compile.md)
  monkeypatch.setitem(
    generator_lib.PER_IMAGE_FORM_BY_BACKEND,
    'tpu',
    generator_lib.MODULATED_ACTIVATIONS,
  )
  # Another choice for TPUs changes their programs only.
  assert batched_products('tpu') == 0
  assert batched_products('cuda') > 0
