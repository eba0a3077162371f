"""Keeps the host's freed memory for reuse.

So CPU training does not page-fault every step.

XLA:CPU allocates each execution's temporary buffer (several GB for a 64x64
training step) from its worker threads. glibc serves a block that large from a
fresh `mmap` and unmaps it again on free, so every step touches all of its
working set for the first time: the kernel faults in and zeroes each 4 KiB
page. The measured cost and gain are in docs/benchmarks.md, "Reused host memory
and its trade-off".

`reuse_freed_memory()` tells glibc, through `mallopt`, to serve every thread
from the main heap (one arena), never to `mmap` a block, and never to give freed
memory back to the system. The process keeps its largest heap: at least the
step's working set, and more when glibc's aligned blocks miss the holes the last
step freed (the same section gives the resident sizes measured). It must run
before JAX starts its backend (the first computation or device query), which is
when XLA starts its worker threads: a thread that already owns an arena keeps
mapping and unmapping. Importing JAX starts none. Every command line calls it
first (`cips_jax.cli.run`), and so do the benchmarks; a program of one's own can
call it at its start, or set `CIPS_JAX_SYSTEM_MALLOC=1` in a command's
environment to keep glibc's defaults.

The library's own calls do not depend on it: a generator render is one compiled
program whose temporaries are allocated once per call (see `sampling`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import sys

from absl import logging

# set to 1 to leave glibc's defaults alone
OPT_OUT_VARIABLE = 'CIPS_JAX_SYSTEM_MALLOC'
# whether reuse_freed_memory() changed the settings in this process
configured = False

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


# Device nodes of the accelerators JAX's backends drive: TPU chips (accel on
# v2-v5e, vfio on v5p and v6e), NVIDIA and AMD GPUs.
ACCELERATOR_DEVICE_FILES = (
  '/dev/accel*',
  '/dev/vfio/[0-9]*',
  '/dev/nvidia[0-9]*',
  '/dev/kfd',
)


def accelerator_available() -> bool:
  """Whether JAX will run on an accelerator here: a backend for one (a PJRT
  plugin or libtpu) is installed and the machine has its device files.

  Decided without importing JAX, from JAX_PLATFORMS, the installed packages and
  `ACCELERATOR_DEVICE_FILES`. An installed libtpu alone (for compiling TPU
  programs on a CPU machine, `pip install -e .[tpu]`) leaves JAX on the CPU.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.strip().lower() != 'cpu'
  installed = bool(
    list(importlib.metadata.entry_points(group='jax_plugins'))
  ) or (importlib.util.find_spec('libtpu') is not None)
  return installed and any(
    glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES
  )


def jax_backend_started() -> bool:
  """Whether JAX has started a backend in this process.

  Starting one starts XLA's threads.
  """
  xla_bridge = sys.modules.get('jax._src.xla_bridge')  # only if JAX is imported
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return bool(started is not None and started())


def is_glibc() -> bool:
  """Whether this process runs on glibc.

  `reuse_freed_memory` uses glibc's mallopt settings.
  """
  return _glibc() is not None


def _glibc():
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  # musl and other C libraries have no gnu_get_libc_version (nor these mallopt
  # numbers).
  return libc if hasattr(libc, 'gnu_get_libc_version') else None


def reuse_freed_memory(cpu_only: bool = True) -> bool:
  """Configures glibc malloc to keep and reuse freed memory.

  Returns whether it did.

  Does nothing (returns False) when: the C library is not glibc; a JAX backend
  has already started (its threads hold their own arenas, and changing the
  settings under them makes faults worse, not better);
  `CIPS_JAX_SYSTEM_MALLOC=1` is set; or, with `cpu_only`, JAX will run on an
  accelerator (`accelerator_available`: its device memory is not malloc's, and a
  single arena could slow the host's input pipeline).
  """
  if os.environ.get(OPT_OUT_VARIABLE, '') not in ('', '0'):
    return False
  if cpu_only and accelerator_available():
    return False
  if jax_backend_started():
    logging.warning(
      'host_malloc.reuse_freed_memory: a JAX backend is already running, so '
      'glibc malloc is left as it is; call it before the first computation.'
    )
    return False
  libc = _glibc()
  if libc is None:
    return False
  global configured
  # -1 converts to the largest size_t: never trim the heap.
  configured = all(
    libc.mallopt(param, value) == 1
    for param, value in (
      (_M_ARENA_MAX, 1),
      (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, -1),
    )
  )
  return configured
