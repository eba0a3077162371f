"""cips_jax.host_malloc: XLA's per-call temporary memory is reused instead of
faulted in anew.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from cips_jax import host_malloc

# One jitted call with 256 MiB of XLA temporaries (an im2col-like concatenation
# and its transpose); prints the minor page faults of each of a few calls after
# the first. It is applied as the commands do: after the package (and JAX) are
# imported, before the first computation starts a backend.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    import cips_jax
    from cips_jax import host_malloc
    applied = host_malloc.reuse_freed_memory()
    def step(x, w):
      columns = jnp.concatenate([x[:, i:i + 4096] for i in range(8)], axis=-1)
      return jnp.sum(jnp.tanh(columns.T @ w), axis=0)
    x, w = jnp.ones((1024, 4096 + 8)), jnp.ones((1024, 64))
    step = jax.jit(step)
    temp = step.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(x, w))
    faults = []
    for _ in range(12):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(x, w))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    pages = temp // 4096
    report = {'applied': applied, 'faults': faults, 'temp_pages': pages}
    print(json.dumps(report))
""")


def _probe(**env):
  result = subprocess.run(
    [sys.executable, '-c', _PROBE],
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_malloc.is_glibc(), reason='needs glibc (Linux)')
def test_reused_memory_is_not_faulted_in_again_each_call():
  system = _probe(CIPS_JAX_SYSTEM_MALLOC='1')
  reused = _probe()
  assert not system['applied'] and reused['applied']
  pages = system['temp_pages']
  # 256 MiB: far above glibc's largest mmap threshold.
  assert pages >= 2**16, system
  # glibc's default maps the temporaries afresh for every call and faults in
  # every page.
  assert min(system['faults']) > pages // 2, system
  # Kept and reused, most calls touch no new page. Some still do: glibc's
  # aligned allocation needs a little more than the block the last call freed,
  # so the heap grows a few times (at moments that depend on thread timing)
  # before its free blocks fit.
  faulted = sum(count > pages // 2 for count in reused['faults'])
  assert faulted <= len(reused['faults']) // 2, reused


_IMPORT_PROBE = textwrap.dedent("""
    import json, os, sys
    environment = dict(os.environ)
    import cips_jax
    from cips_jax import host_malloc
    print(json.dumps({
        'lazy_attributes': hasattr(cips_jax, '__getattr__'),
        'public_modules': all(n in vars(cips_jax) for n in cips_jax.__all__),
        'malloc_configured': host_malloc.configured,
        'backend_started': host_malloc.jax_backend_started(),
        'environment_changed': dict(os.environ) != environment,
    }))
""")


def test_importing_the_package_loads_it_whole_and_changes_no_process_state():
  result = subprocess.run(
    [sys.executable, '-c', _IMPORT_PROBE],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {
    'lazy_attributes': False,
    'public_modules': True,
    'malloc_configured': False,
    'backend_started': False,
    'environment_changed': False,
  }


def test_does_nothing_once_a_backend_runs_or_when_opted_out(
  monkeypatch, caplog
):
  jax.devices()  # starts the backend, as any test that computes has
  monkeypatch.delenv(host_malloc.OPT_OUT_VARIABLE, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_malloc.reuse_freed_memory() is False
  assert 'already running' in caplog.text
  monkeypatch.setenv(host_malloc.OPT_OUT_VARIABLE, '1')
  caplog.clear()
  assert host_malloc.reuse_freed_memory() is False
  assert not caplog.text  # the opt-out is checked first, silently


def test_accelerator_detection_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert host_malloc.accelerator_available()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not host_malloc.accelerator_available()


def test_an_installed_libtpu_without_a_chip_leaves_the_cpu_settings(
  monkeypatch, tmp_path
):
  # The suite's own environment installs libtpu to compile TPU programs; a
  # machine without a chip still runs JAX, and so training, on its CPU.
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  real_find_spec = host_malloc.importlib.util.find_spec
  monkeypatch.setattr(
    host_malloc.importlib.util,
    'find_spec',
    lambda name: object() if name == 'libtpu' else real_find_spec(name),
  )
  monkeypatch.setattr(
    host_malloc.importlib.metadata, 'entry_points', lambda group: []
  )
  chip = tmp_path / 'accel0'
  monkeypatch.setattr(
    host_malloc, 'ACCELERATOR_DEVICE_FILES', (str(tmp_path / 'accel*'),)
  )
  assert not host_malloc.accelerator_available()
  chip.touch()
  assert host_malloc.accelerator_available()
  # Without a backend installed, a device file alone is no accelerator.
  monkeypatch.setattr(
    host_malloc.importlib.util, 'find_spec', lambda name: None
  )
  assert not host_malloc.accelerator_available()
