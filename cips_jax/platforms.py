"""Choices made per backend, resolved for the platform a program is built for.

    out = platforms.dispatch(
        {'cpu': 'im2col'}, 'xla', lambda impl: convolve(impl, x)
    )

Some computations have several exact forms whose speed differs by backend
(the discriminator's convolutions, the generator's per-image style form).
Reading `jax.default_backend()` while tracing would bake the tracing
machine's choice into every program, so a step exported from a CPU for a TPU
would carry the CPU's im2col convolutions. `dispatch` stages the choice out
with `lax.platform_dependent` instead: when jax lowers for one platform it
keeps only that platform's branch, so nothing is paid at run time; a
multi-platform export keeps both and picks on the device.

Staging costs tracing time, though: every branch is traced, and
differentiating through the staged choice (the training step) traces more
again: the churches step's R1 program traces in 10.8 s staged against 4.6 s
with one branch on the 2-core EPYC (`benchmarks/tracing.py`). A program
jitted over a mesh of concrete devices is lowered for their platform, so
`parallel.tracing_over(mesh)` pins the choice to it (`pinned_to`); an export
for other platforms, from such a program, names them (`exporting_for`). The
commands (`cli.run`) pin their whole process to its backend: their programs
run where they are built and are never exported (a `sample --mode=grid` of the
model in the box: 3.3-4.0 s staged, 2.9 s pinned, on one EPYC core). Library
calls stay staged: a caller may export what they build.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Mapping, Optional, TypeVar

import jax

Choice = TypeVar('Choice')
Result = TypeVar('Result')

# The backend the program being traced is built for, where it is known; None
# stages the choice out.
_PINNED_BACKEND: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
  'cips_jax_pinned_backend', default=None
)
# An export's platform (or _ALL_PLATFORMS), which wins over the pin.
_ALL_PLATFORMS = 'all'
_EXPORTING_FOR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
  'cips_jax_exporting_for', default=None
)

# jax.default_backend()'s names -> the platforms lax.platform_dependent knows.
PLATFORMS_OF_BACKEND = {
  'cpu': ('cpu',),
  'gpu': ('cuda', 'rocm'),
  'tpu': ('tpu',),
}


def dispatch(
  by_backend: Mapping[str, Choice],
  default: Choice,
  fn: Callable[[Choice], Result],
) -> Result:
  """fn(the choice of the platform the program is lowered for).

  Args:
    by_backend: {backend ('cpu', 'gpu', 'tpu'): choice}; others take
      `default`.
    default: the choice of every other platform.
    fn: builds the computation for one choice (it may close over tracers).
  Returns:
    fn(choice); traced once per distinct choice.
  """
  if set(by_backend.values()) <= {default}:
    return fn(default)  # one form everywhere: nothing to stage out
  backend = _EXPORTING_FOR.get() or _PINNED_BACKEND.get()
  if backend is not None and backend != _ALL_PLATFORMS:
    return fn(by_backend.get(backend, default))
  branches = {
    platform: functools.partial(fn, choice)
    for backend, choice in by_backend.items()
    for platform in PLATFORMS_OF_BACKEND[backend]
  }
  return jax.lax.platform_dependent(
    default=functools.partial(fn, default), **branches
  )


def resolve(
  by_backend: Mapping[str, Choice], default: Choice, backend: str | None = None
) -> Choice:
  """The choice for `backend` (default: jax's default backend), eagerly.

  For logs and for code that runs where it is traced; programs that may be
  exported use `dispatch`.
  """
  return by_backend.get(backend or jax.default_backend(), default)


@contextlib.contextmanager
def pinned_to(backend: str) -> Iterator[None]:
  """Within: `dispatch` traces only `backend`'s branch ('cpu', 'gpu', 'tpu').

  For tracing a program that will be lowered for `backend` only (jitted over
  its devices). jax caches traces without this setting: a process that builds
  one function for several platforms clears its caches in between.
  """
  if backend not in PLATFORMS_OF_BACKEND:
    raise ValueError(
      f'backend must be one of {sorted(PLATFORMS_OF_BACKEND)}, got {backend!r}'
    )
  token = _PINNED_BACKEND.set(backend)
  try:
    yield
  finally:
    _PINNED_BACKEND.reset(token)


@contextlib.contextmanager
def built_for(backend: str) -> Iterator[None]:
  """Within: `pinned_to(backend)` where the choices name that backend; else
  the choices stay staged (a platform they do not name, such as a plugin's).

  For code that builds programs for its own devices: a command's process
  (`cli.run`), a program jitted over a mesh (`parallel.tracing_over`).
  """
  if backend not in PLATFORMS_OF_BACKEND:
    yield
    return
  with pinned_to(backend):
    yield


@contextlib.contextmanager
def exporting_for(backend: Optional[str] = None) -> Iterator[None]:
  """Within: `dispatch` makes `backend`'s choice, even under `pinned_to`; with
  no backend, it stages every choice out.

  For exporting a program jitted over one platform's devices for another, or
  for several (`jax.export(..., platforms=...)`). jax caches traces without
  this setting: clear them (`jax.clear_caches()`) between exports of one
  function for different platforms.
  """
  if backend is not None and backend not in PLATFORMS_OF_BACKEND:
    raise ValueError(
      f'backend must be one of {sorted(PLATFORMS_OF_BACKEND)}, got {backend!r}'
    )
  token = _EXPORTING_FOR.set(backend or _ALL_PLATFORMS)
  try:
    yield
  finally:
    _EXPORTING_FOR.reset(token)
