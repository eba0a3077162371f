"""Keeps the host's freed memory for reuse, so CPU training does not page-fault every step.

XLA:CPU allocates each execution's temporary buffer (several GB for a 64x64 training step,
2 GB for one of D's 64x64 convolutions at batch 16) from its worker threads. glibc serves
a block that large from a fresh `mmap` and unmaps it again on free, so every step touches
all of its working set for the first time: the kernel faults in and zeroes each 4 KiB page.
On the project's 2-core machine that was 557k page faults and 1.1 s of kernel time per call
of that one convolution (2.45 s -> 1.87 s once the memory is reused), and the full 64x64
training step went from 22.80 s to 18.72 s (benchmarks/results/train_cpu_2core_*_malloc.json).

`reuse_freed_memory()` tells glibc, through `mallopt`, to serve every thread from the main
heap (one arena), never to `mmap` a block, and never to give freed memory back to the system.
The process keeps its largest heap: at least the step's working set, and more when glibc's
aligned blocks miss the holes the last step freed (7.6 GB for that step in one run, as with
the defaults; 13.3 GB in another). It must run before JAX starts its threads, i.e. before `import jax`: a thread that
already owns an arena keeps mapping and unmapping. The command-line entry points
(`cips_jax.main`, `cips_jax.sample`, `cips_jax.evaluate`) and `benchmarks/` call it first.

This module imports nothing from JAX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

from absl import logging

OPT_OUT_VARIABLE = 'CIPS_JAX_SYSTEM_MALLOC'   # set to 1 to leave glibc's defaults alone
configured = False   # whether reuse_freed_memory() changed the settings in this process

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def accelerator_installed() -> bool:
  """Whether a JAX accelerator backend (a PJRT plugin or libtpu) is installed.

  Decided without importing JAX, from the installed packages and JAX_PLATFORMS.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.strip().lower() != 'cpu'
  if list(importlib.metadata.entry_points(group='jax_plugins')):
    return True
  return importlib.util.find_spec('libtpu') is not None


def _glibc():
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  # musl and other C libraries have no gnu_get_libc_version (nor these mallopt numbers).
  return libc if hasattr(libc, 'gnu_get_libc_version') else None


def reuse_freed_memory(cpu_only: bool = True) -> bool:
  """Configures glibc malloc to keep and reuse freed memory. Returns whether it did.

  Does nothing (returns False) when: the C library is not glibc; JAX is already imported
  (its threads hold their own arenas, and changing the settings under them makes faults
  worse, not better); `CIPS_JAX_SYSTEM_MALLOC=1` is set; or, with `cpu_only`, an accelerator
  backend is installed (its device memory is not malloc's, and a single arena could slow
  the host's input pipeline).
  """
  if os.environ.get(OPT_OUT_VARIABLE, '') not in ('', '0'):
    return False
  if cpu_only and accelerator_installed():
    return False
  if 'jax' in sys.modules:
    logging.warning('host_malloc.reuse_freed_memory: jax is already imported, so glibc '
                    'malloc is left as it is; call it before importing jax.')
    return False
  libc = _glibc()
  if libc is None:
    return False
  global configured
  # -1 converts to the largest size_t: never trim the heap.
  configured = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  return configured
