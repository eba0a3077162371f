"""cips_jax.host_malloc: XLA's per-call temporary memory is reused instead of faulted in anew."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cips_jax import host_malloc

# One jitted call with 256 MiB of XLA temporaries (an im2col-like concatenation and its
# transpose); prints the minor page faults of each of a few calls after the first.
_PROBE = textwrap.dedent('''
    import json, resource, sys
    from cips_jax import host_malloc
    applied = host_malloc.reuse_freed_memory()
    import jax, jax.numpy as jnp
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
    print(json.dumps({'applied': applied, 'faults': faults, 'temp_pages': temp // 4096}))
''')


def _probe(**env):
  result = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, timeout=300)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_malloc._glibc() is None, reason='needs glibc (Linux)')
def test_reused_memory_is_not_faulted_in_again_each_call():
  system = _probe(CIPS_JAX_SYSTEM_MALLOC='1')
  reused = _probe()
  assert not system['applied'] and reused['applied']
  pages = system['temp_pages']
  assert pages >= 2 ** 16, system   # 256 MiB: far above glibc's largest mmap threshold
  # glibc's default maps the temporaries afresh for every call and faults in every page.
  assert min(system['faults']) > pages // 2, system
  # Kept and reused, most calls touch no new page. Some still do: glibc's aligned
  # allocation needs a little more than the block the last call freed, so the heap grows a
  # few times (at moments that depend on thread timing) before its free blocks fit.
  faulted = sum(count > pages // 2 for count in reused['faults'])
  assert faulted <= len(reused['faults']) // 2, reused


@pytest.mark.parametrize('command', ['main', 'sample', 'evaluate'])
def test_importing_the_package_and_its_commands_does_not_import_jax(command):
  # The commands configure malloc before their first JAX import; the package must not
  # import JAX before them. The public modules still load on first use.
  code = (f'import sys, cips_jax, cips_jax.{command}; '
          'assert "jax" not in sys.modules, "jax imported"; '
          'from cips_jax import grids; assert "jax" in sys.modules; '
          'assert cips_jax.models.CIPSskip and cips_jax.sampling.render')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr


def test_does_nothing_once_jax_is_imported_or_when_opted_out(monkeypatch, caplog):
  import jax  # noqa: F401  (as any test process has)
  monkeypatch.delenv(host_malloc.OPT_OUT_VARIABLE, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_malloc.reuse_freed_memory() is False
  assert 'already imported' in caplog.text
  monkeypatch.setenv(host_malloc.OPT_OUT_VARIABLE, '1')
  caplog.clear()
  assert host_malloc.reuse_freed_memory() is False
  assert not caplog.text   # the opt-out is checked first, silently


def test_accelerator_detection_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert host_malloc.accelerator_installed()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not host_malloc.accelerator_installed()
