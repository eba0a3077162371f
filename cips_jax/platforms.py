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
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, TypeVar

import jax

Choice = TypeVar('Choice')
Result = TypeVar('Result')

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
