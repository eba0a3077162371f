"""The accelerator programs built by the real XLA:TPU compiler, on this CPU.

libtpu (the 'tpu' extra: pip install -e '.[tpu]') compiles for a TPU slice
that is not there (`jax.experimental.topologies`): here a v5e slice of 16 chips
in 4 hosts, through benchmarks/tpu_compile.py --ci. Each program must compile,
fit a chip's HBM by XLA:TPU's own memory analysis, do the FLOPs the project
counts from its jaxpr (benchmarks/product_flops.py), and communicate only by
the reductions data parallelism needs. The full table (every program x v4,
v5e, v5p, v6e x 8 and 16+ chips) is docs/tpu_compile.md.

Without libtpu the module is skipped, unless CIPS_JAX_REQUIRE_TPU_COMPILER=1
(CI sets it), which makes its absence a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

import support

_REQUIRED = os.environ.get('CIPS_JAX_REQUIRE_TPU_COMPILER') == '1'
if importlib.util.find_spec('libtpu') is None:
  if _REQUIRED:
    raise RuntimeError(
      'CIPS_JAX_REQUIRE_TPU_COMPILER=1 but libtpu is missing: pip install -e '
      "'.[tpu]'"
    )
  pytest.skip(
    "libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True
  )

SCRIPT = support.REPO / 'benchmarks' / 'tpu_compile.py'


@pytest.fixture(scope='module')
def compiled():
  result = support.run_python(SCRIPT, '--ci', timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  (name, target), *others = report['targets'].items()
  assert not others
  return target


def test_the_slice_spans_several_hosts(compiled):
  assert compiled['devices'] == 16 and compiled['hosts'] == 4
  assert compiled['chip'] == 'TPU v5e'


def test_every_program_compiles_and_fits_a_chip(compiled):
  programs = compiled['programs']
  assert set(programs) == {
    'fused_layer_512_512',
    'generate_fused_small_bfloat16',
    'train_step_small_bfloat16',
  }
  for name, found in programs.items():
    assert 'error' not in found, (name, found)
    assert found['memory_total_bytes'] <= found['hbm_bytes'], name
    assert found['memory_bytes']['arguments'] > 0, name


def test_mosaic_compiles_the_fused_kernel_without_communication(compiled):
  fused = compiled['programs']['fused_layer_512_512']
  assert fused['mosaic_kernels'] >= 1
  # Each device runs its own images: nothing crosses chips.
  assert fused['collectives'] == {}
  # The kernel declares its cost (a custom call is opaque to XLA); the count
  # walks the kernel body times its grid.
  assert fused['flops_ratio'] == pytest.approx(1.0, abs=0.05)


def test_the_fused_generator_compiles_under_a_sharded_jit(compiled):
  # XLA refuses to partition a Mosaic call ('Mosaic kernels cannot be
  # automatically partitioned'): the generator's fused layers split
  # themselves over the devices (kernels/fused_pixel.py), one kernel per layer.
  generate = compiled['programs']['generate_fused_small_bfloat16']
  assert generate['mosaic_kernels'] >= 8
  assert generate['collectives'] == {}


def test_the_compiler_counts_the_generators_products(compiled):
  # G's fused layers and its mapping and style products: XLA:TPU's FLOPs
  # within 5% of the products of the jaxpr (the kernels' body times their
  # grid; XLA sees the cost each kernel declares).
  generate = compiled['programs']['generate_fused_small_bfloat16']
  assert generate['flops_ratio'] == pytest.approx(1.0, abs=0.05)
  assert generate['own_flops'] > 0


def test_a_data_parallel_step_only_reduces_over_the_devices(compiled):
  step = compiled['programs']['train_step_small_bfloat16']
  # No all-gather, all-to-all or permutation (of the batch, or of the
  # replicated state): only reductions.
  assert set(step['collectives']) == {'all-reduce'}, step['collectives']
  reduced = step['collectives']['all-reduce']['bytes']
  # Every parameter's gradient is reduced once; besides it only small values
  # (losses, D's minibatch-stddev statistics, whose groups span devices).
  assert step['parameter_bytes'] <= reduced <= 1.5 * step['parameter_bytes']


def test_the_training_steps_count_is_the_products_and_ds_padded_windows(
  compiled,
):
  # XLA:TPU counts D's convolutions at more than their products (1.28x for a
  # 3x3 on 32x32, 1.52x for the stride-2 3x3 on 33x33: its layouts' padding,
  # docs/tpu_compile.md), never less than the products.
  step = compiled['programs']['train_step_small_bfloat16']
  assert 0.95 <= step['flops_ratio'] <= 1.6


def test_the_docs_table_is_the_checked_in_json(tmp_path):
  # docs/tpu_compile.md is regenerated from benchmarks/results/tpu_compile.json
  # by one command; the page in the repository must be its output.
  page = support.REPO / 'docs' / 'tpu_compile.md'
  copy = tmp_path / 'tpu_compile.md'
  copy.write_text(page.read_text())
  result = support.run_python(SCRIPT, f'--table={copy}', timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert copy.read_text() == page.read_text()
