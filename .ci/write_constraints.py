"""Writes constraints.txt: the installed version of every package cips_jax
needs, with its test and tpu extras, and of everything those need in turn.

    python .ci/write_constraints.py   # after a passing `bash .ci/run`

`.ci/run` installs with `-c constraints.txt`, so the suite always runs on the
versions written here; rerun this script after upgrading them on purpose.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTRAS = ('test', 'tpu')


def _name(text: str) -> str:
  return re.sub(r'[-_.]+', '-', text).lower()


def closure(name: str, extras: tuple[str, ...]) -> dict[str, str]:
  """{distribution name: installed version} of `name`[extras]'s dependencies."""
  found: dict[str, str] = {}
  pending, visited = [(name, extras)], set()
  while pending:
    current, wanted = pending.pop()
    if (_name(current), wanted) in visited:
      continue
    visited.add((_name(current), wanted))
    distribution = importlib.metadata.distribution(current)
    for line in distribution.requires or []:
      requirement = Requirement(line)
      marker = requirement.marker
      if marker is not None and not any(
        marker.evaluate({'extra': extra}) for extra in ('', *wanted)
      ):
        continue
      key = _name(requirement.name)
      try:
        version = importlib.metadata.version(requirement.name)
      except importlib.metadata.PackageNotFoundError:
        continue  # an optional dependency this platform does not install
      found[key] = version
      pending.append((requirement.name, tuple(sorted(requirement.extras))))
  found.pop('cips-jax', None)
  return found


def main() -> None:
  pins = closure('cips_jax', EXTRAS)
  lines = [
    '# The versions the suite passed with (python .ci/write_constraints.py).',
    "# pip install -c constraints.txt -e '.[test,tpu]'",
    *(f'{name}=={version}' for name, version in sorted(pins.items())),
  ]
  (ROOT / 'constraints.txt').write_text('\n'.join(lines) + '\n')
  print(f'{len(pins)} packages pinned in constraints.txt')


if __name__ == '__main__':
  main()
