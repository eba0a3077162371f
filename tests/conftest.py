"""Fixtures the test modules share: prepared data, tiny models, one trained run.

The suite runs on two workers (pytest-xdist, `-n 2` in pyproject.toml). What the
session shares is made once for all of them, under a file lock, in the shared
temporary folder: the prepared data and the trained tiny run.

Two settings make the suite's many small compilations cheaper, for this process
and every subprocess the tests start (they inherit the environment):
- one persistent XLA compilation cache (a temporary folder, removed at the end):
  the training, sampling and evaluation commands that several tests run compile
  the same programs, and each is compiled once;
- XLA:CPU's backend optimisation level 0 (`--xla_backend_optimization_level=0`):
  LLVM spends less time on code that runs on tiny shapes; and XLA:CPU's older
  elemental emitter for fusions (`--xla_cpu_use_fusion_emitters=false`): the
  tiny training step compiles in 2.3 s instead of 3.8 s on the slower 2-core
  CPU (11.3 s at the default level). Results keep their meaning (the tests
  compare programs compiled the same way, or against tolerances); set XLA_FLAGS
  yourself to test other settings.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import filelock
import jax
import pytest

from cips_jax import checkpoints
from cips_jax import data
from cips_jax import models
from cips_jax import platforms
from cips_jax.metrics import inception
import support

# XLA:CPU flags for the suite's many small programs (see the docstring).
_FAST_COMPILE_FLAGS = (
  '--xla_backend_optimization_level=0',
  '--xla_cpu_use_fusion_emitters=false',
)
_CACHE_VARIABLES = {
  'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
  'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
}


def pytest_configure(config):
  del config
  if 'XLA_FLAGS' not in os.environ:  # read when the backend starts, after this
    os.environ['XLA_FLAGS'] = ' '.join(_FAST_COMPILE_FLAGS)
  # The tests run on CPUs. With libtpu installed (the 'tpu' extra, for
  # tests/test_tpu_compile.py), jax would otherwise try to start a TPU in
  # every process, and libtpu print a page of warnings on a machine without
  # one. Compiling for a TPU topology needs no TPU backend.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  jax.config.update('jax_platforms', os.environ['JAX_PLATFORMS'])
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:  # the caller chose one: keep it
    return
  cache = tempfile.mkdtemp(prefix='cips_jax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  os.environ['CIPS_JAX_TEST_CACHE_TO_REMOVE'] = cache
  os.environ.update(_CACHE_VARIABLES)
  jax.config.update('jax_compilation_cache_dir', cache)
  for name, value in _CACHE_VARIABLES.items():
    jax.config.update(
      name.lower(), float(value) if 'TIME' in name else int(value)
    )


def pytest_unconfigure(config):
  if hasattr(
    config, 'workerinput'
  ):  # an xdist worker: the controller cleans up
    return
  cache = os.environ.pop('CIPS_JAX_TEST_CACHE_TO_REMOVE', None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


# The longest modules first (seconds measured on 2 cores; the rest follow in
# their usual order). With `--dist loadscope` a module runs whole on one
# worker, so a long one collected last would leave the other worker idle.
_LONGEST_FIRST = (
  'test_readme.py',  # ~205
  'test_evaluate.py',  # ~150
  'test_train_e2e.py',  # ~105
  'test_run_safety.py',  # ~100
  'test_sample_command.py',  # ~90
  'test_train.py',  # ~90
  'test_generator.py',  # ~85
  'test_lowering.py',  # ~75
  'test_command_input.py',  # ~55
  'test_notebook.py',  # ~45
  'test_sampling.py',  # ~45
  'test_device_check.py',  # ~40
  'test_augment.py',  # ~40
  'test_continue_reference_run.py',  # ~35
  'test_multihost.py',  # ~30
  'test_torch_fuzz.py',  # ~27
  'test_pretrained.py',  # ~25
  'test_lmdb_data.py',  # ~25
  'test_host_malloc.py',  # ~25
  'test_tpu_compile.py',  # ~20
  'test_torch_export.py',  # ~20
)


# The slow tier (`pytest -m slow`; the day-to-day tier is `-m "not slow"`):
# modules that train through the command line, start several processes, read
# the shared 120-step run, or run the real Inception network at scale. CI runs
# both tiers.
SLOW_MODULES = frozenset(
  {
    'test_readme.py',  # every README command, each a process
    'test_train_e2e.py',  # training runs: resume, SIGTERM/SIGKILL, 8 devices
    'test_sample_command.py',  # the shared 120-step run, the commands
    'test_evaluate.py',  # Inception: FID/KID, perceptual inversion
    'test_lowering.py',  # every program lowered for cuda and tpu
    'test_run_safety.py',  # the lock and damage with live training processes
    'test_multihost.py',  # two processes, one run
    'test_notebook.py',  # the notebook, executed
    'test_device_check.py',  # the device check's and memory plan's smoke runs
    'test_continue_reference_run.py',  # continuing a PyTorch run
    'test_lmdb_data.py',  # LMDB preparation, then training
    'test_host_malloc.py',  # repeated steps in fresh processes
    'test_pretrained.py',  # the shipped model against a fresh one
    'test_sharded_embedding.py',  # an 8-device process
    'test_torch_export.py',  # the shared 120-step run, exported
    'test_tpu_compile.py',  # XLA:TPU compiling for a 16-chip slice
    'test_console.py',  # first commands as a user runs them, each a process
  }
)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.path.name in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  # A stable sort: each module keeps its own order.
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """A folder every worker of this session sees (the workers' common parent)."""
  root = tmp_path_factory.getbasetemp()
  if 'PYTEST_XDIST_WORKER' in os.environ:
    root = root.parent
  return root


def _made_once(tmp_path_factory, name, make):
  """make(folder) -> JSON-able result, run by the first worker that asks; the
  others wait for it and get the same (folder, result)."""
  root = _shared_root(tmp_path_factory)
  folder, done = root / name, root / f'{name}.json'
  with filelock.FileLock(str(root / f'{name}.lock')):
    if not done.exists():
      folder.mkdir(exist_ok=True)
      done.write_text(json.dumps(make(folder)))
  return folder, json.loads(done.read_text())


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data root with the procedural 32x32 landscapes and 64x256 panoramas."""

  def prepare(folder):
    for config in ('s32', 'panorama_s64'):
      data.prepare_procedural(folder, config)
    return None

  return _made_once(tmp_path_factory, 'data', prepare)[0]


@pytest.fixture(scope='session')
def inception_extractor():
  """The real Inception-v3 feature extractor; skips (or fails in CI) without its
  weights.
  """
  try:
    # At the suite's lowered XLA:CPU optimisation level (the docstring above):
    # on the tests' few images its quicker compile outweighs the slower
    # convolutions.
    return inception.InceptionFeatures(batch_size=8)
  except FileNotFoundError as err:
    if os.environ.get('CIPS_JAX_REQUIRE_INCEPTION') == '1':
      pytest.fail(f'CIPS_JAX_REQUIRE_INCEPTION=1 but no weights: {err}')
    pytest.skip(f'Inception weights not installed ({str(err).splitlines()[1]})')


def _inception_installed() -> bool:
  try:
    inception.find_weights()
    return True
  except FileNotFoundError:
    return False


TINY_RUN_STEPS = 120


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_dir):
  """One training run of tests/configs/tiny.py, by the command line, 120 steps.

  Checkpoints and samples every 20 steps, a profiler trace of steps 3 and 4,
  and (when the Inception weights are installed) FID/KID of 8 samples at the
  end. Tests that sample, evaluate,
  resume or compare against an uninterrupted run read this one workdir; none
  writes into it. Returns (workdir, the command's output).
  """

  def train(workdir):
    args = support.tiny_run_flags(data_dir, num_steps=TINY_RUN_STEPS)
    args.append('--config.logging.profile_steps=2')
    if _inception_installed():
      args += [
        '--config.logging.eval_every_steps=120',
        '--config.logging.eval_num_samples=8',
        '--config.logging.eval_num_real=8',
      ]
    result = support.run_python(
      '-m', 'cips_jax.main', f'--workdir={workdir}', *args
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr

  return _made_once(tmp_path_factory, 'tiny_run', train)


@pytest.fixture(scope='session')
def exported_generators(tmp_path_factory):
  """{cylindrical: path} of two exported tiny (8x8, 16-wide) generators."""
  root = tmp_path_factory.mktemp('exports')
  paths = {}
  for cylindrical in (False, True):
    gen = models.CIPSskip(
      size=8,
      hidden_size=16,
      style_dim=16,
      n_mlp=1,
      max_channels=16,
      cylindrical=cylindrical,
    )
    variables = models.init(gen, jax.random.PRNGKey(int(cylindrical)))
    paths[cylindrical] = str(root / f'cylindrical_{cylindrical}')
    checkpoints.export_generator(paths[cylindrical], gen, variables)
  return paths


@pytest.fixture(autouse=True)
def _cpu_choices(request):
  """Each test traces the CPU's branch of the per-platform choices only.

  Outside a mesh (`parallel.tracing_over`), `platforms.dispatch` stages every
  platform's choice out, and the CPU's lowering keeps only its own: the same
  program, after tracing every branch. Pinned, tests trace a quarter less
  (test_train and test_sampling: 94 s -> 71 s on one EPYC core). The other
  platforms' branches are traced, lowered and checked in test_lowering, whose
  tests (and any marked `staged_choices`) run unpinned, on fresh traces.
  """
  if request.node.get_closest_marker('staged_choices'):
    jax.clear_caches()  # no trace made under the pin is reused
    yield
    return
  with platforms.pinned_to('cpu'):
    yield
