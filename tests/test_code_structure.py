"""The shape of the code: imports run one way, and no module reaches into
another's privates.

- Command lines (`main`, `sample`, `evaluate`, `convert_command`,
  `data_command`) import the library; nothing imports a command but its
  package's `__main__` entry point; the package's parts import one way.
- Public definitions have users outside their module (at most a few
  exceptions), and every exported name one outside its package.
- No module uses a private name (`module._name`) of another cips_jax module.
- Imports sit at the top of modules; one inside a function needs a comment
  saying why.
- Test modules (with tests/configs and tests/scripts) share helpers through
  conftest.py and support.py, never import each other, and use temporary
  directories rather than fixed /tmp paths.
- Scripts, configs and benchmarks use the package as its users do: no private
  names.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import support

PACKAGE = support.REPO / 'cips_jax'
COMMANDS = {
  'cips_jax.main',
  'cips_jax.sample',
  'cips_jax.evaluate',
  'cips_jax.convert_command',
  'cips_jax.data_command',
}
# `python -m cips_jax.convert` and `.data`: the library package's __main__,
# an entry point that runs its command and nothing else.
ENTRY_POINTS = {
  'cips_jax.convert.__main__': 'cips_jax.convert_command',
  'cips_jax.data.__main__': 'cips_jax.data_command',
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(support.REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_modules() -> dict[str, ast.Module]:
  return {
    module_name(path): ast.parse(path.read_text(), str(path))
    for path in sorted(PACKAGE.rglob('*.py'))
  }


def imported_modules(tree: ast.Module) -> set[str]:
  """Every module an AST imports (`from a import b` counts as a and a.b)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_the_commands_exist_and_nothing_imports_them():
  modules = package_modules()
  assert COMMANDS <= set(modules) and set(ENTRY_POINTS) <= set(modules)
  offenders = {
    name: sorted(imported_modules(tree) & COMMANDS)
    for name, tree in modules.items()
    if imported_modules(tree) & COMMANDS and name not in ENTRY_POINTS
  }
  assert not offenders, f'modules that import a command line: {offenders}'
  for entry, command in ENTRY_POINTS.items():
    package = imported_modules(modules[entry]) - {'cips_jax'}
    assert package == {'cips_jax.cli', command}, (entry, package)


def _package_of(module: str) -> str:
  """'cips_jax.data.builders' -> 'cips_jax.data'; top-level modules are
  their own."""
  parts = module.split('.')
  return '.'.join(parts[:2])


def test_imports_between_the_package_parts_run_one_way():
  # Library modules and subpackages (data/, convert/, metrics/, ...) form no
  # cycle: a subpackage never imports a module that imports it. Commands and
  # entry points sit on top and are left out.
  modules = package_modules()
  library = {
    name: tree
    for name, tree in modules.items()
    # The package's __init__ re-exports the public modules: not a part.
    if name not in COMMANDS and name not in ENTRY_POINTS and name != 'cips_jax'
  }
  parts = {_package_of(name) for name in library}
  edges = {part: set() for part in parts}
  for name, tree in library.items():
    for imported in imported_modules(tree):
      target = _package_of(imported)
      if target in parts and target != _package_of(name):
        edges[_package_of(name)].add(target)

  def reaches(start, goal, seen=()):
    return any(
      nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt)))
      for nxt in edges[start]
    )

  cycles = sorted(
    f'{a} -> {b} -> ... -> {a}'
    for a in parts
    for b in edges[a]
    if reaches(b, a)
  )
  assert not cycles, cycles


def private_names_reached(name: str, tree: ast.Module) -> list[str]:
  """`module._x` uses and `from cips_jax.m import _x` imports in `tree`."""
  offenders = []
  # Local names bound to cips_jax modules: `from cips_jax import x [as y]`,
  # `import a.b as c`.
  aliases = {}
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.ImportFrom)
      and node.module
      and node.module.startswith('cips_jax')
    ):
      for alias in node.names:
        aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
        if alias.name.startswith('_'):
          offenders.append(f'{name} imports {node.module}.{alias.name}')
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('cips_jax') and alias.asname:
          aliases[alias.asname] = alias.name
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith('_')
      and not node.attr.startswith('__')
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
    ):
      offenders.append(f'{name}: {node.value.id}.{node.attr}')
  return offenders


def test_no_module_reaches_a_private_name_of_another():
  offenders = []
  for name, tree in package_modules().items():
    offenders += private_names_reached(name, tree)
  assert not offenders


# Code that uses the package as its users do: scripts the tests run, test
# configs, experiment configs and benchmarks reach no private name either.
USERS_OF_THE_PACKAGE = sorted(
  [
    *(support.TESTS / 'configs').glob('*.py'),
    *(support.TESTS / 'scripts').glob('*.py'),
    *(support.REPO / 'experiments').glob('*.py'),
    *(support.REPO / 'benchmarks').glob('*.py'),
  ]
)


@pytest.mark.parametrize(
  'path', USERS_OF_THE_PACKAGE, ids=lambda p: str(p.relative_to(support.REPO))
)
def test_scripts_and_configs_reach_no_private_name(path):
  tree = ast.parse(path.read_text(), str(path))
  assert not private_names_reached(path.name, tree)


def test_imports_are_at_the_top_unless_a_comment_says_why():
  offenders = []
  for path in sorted(PACKAGE.rglob('*.py')):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse('\n'.join(lines))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if (
            isinstance(inner, (ast.Import, ast.ImportFrom))
            and '#' not in lines[inner.lineno - 1]
          ):
            offenders.append(f'{path.relative_to(support.REPO)}:{inner.lineno}')
  assert not offenders, f'function-local imports without a reason: {offenders}'


TEST_CODE = sorted(
  [
    *support.TESTS.glob('*.py'),
    *(support.TESTS / 'configs').glob('*.py'),
    *(support.TESTS / 'scripts').glob('*.py'),
  ]
)


@pytest.mark.parametrize(
  'path', TEST_CODE, ids=lambda p: str(p.relative_to(support.TESTS))
)
def test_test_modules_share_helpers_without_importing_each_other(path):
  tree = ast.parse(path.read_text())
  tests = {p.stem for p in support.TESTS.glob('test_*.py')}
  assert not imported_modules(tree) & tests
  literals = [
    node.value
    for node in ast.walk(tree)
    if isinstance(node, ast.Constant) and isinstance(node.value, str)
  ]
  fixed = [
    text for text in literals if text.startswith('/tmp/') and text != '/tmp/'
  ]
  assert not fixed, f'fixed /tmp paths (use tmp_path): {fixed}'
  # Scripts run in subprocesses import helpers too.
  scripts = [
    text
    for text in literals
    if any(
      f'import {test}' in text or f'from {test} ' in text for test in tests
    )
  ]
  assert not scripts, scripts


# Where a public name may find its user: the package, the tests, the
# benchmarks, the experiment configs, the notebook and the documentation.
_READERS = (
  'cips_jax/**/*.py',
  'tests/**/*.py',
  'benchmarks/*.py',
  'experiments/*.py',
  'notebooks/*.ipynb',
  'README.md',
  'docs/*.md',
)
# Public definitions without a user outside their module, at most. They are
# the classes whose names are part of a parameter tree or of a return type
# (the discriminator's and Inception's blocks, memory_plan.Plan).
MOST_PUBLIC_NAMES_WITHOUT_A_USER = 10


def _reader_texts() -> dict[pathlib.Path, str]:
  return {
    path: path.read_text()
    for pattern in _READERS
    for path in support.REPO.glob(pattern)
  }


def test_public_definitions_have_users():
  texts = _reader_texts()
  unused = []
  for path in sorted(PACKAGE.rglob('*.py')):
    # Its own package's __init__ re-exporting a name is not a user.
    others = [
      text
      for other, text in texts.items()
      if other != path
      and not (other.name == '__init__.py' and other.parent == path.parent)
    ]
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not (
        node.name.startswith('_')
      ):
        pattern = re.compile(rf'\b{re.escape(node.name)}\b')
        if not any(pattern.search(text) for text in others):
          unused.append(f'{module_name(path)}.{node.name}')
  assert len(unused) <= MOST_PUBLIC_NAMES_WITHOUT_A_USER, unused


def test_every_exported_name_has_a_user_outside_its_package():
  texts = _reader_texts()
  missing = []
  for init in sorted(PACKAGE.rglob('__init__.py')):
    package = init.parent
    for node in ast.parse(init.read_text()).body:
      if isinstance(node, ast.Assign) and any(
        getattr(target, 'id', None) == '__all__' for target in node.targets
      ):
        for name in ast.literal_eval(node.value):
          pattern = re.compile(rf'\b{re.escape(name)}\b')
          if not any(
            pattern.search(text)
            for path, text in texts.items()
            if package not in path.parents
          ):
            missing.append(f'{module_name(init)}.{name}')
  assert not missing, missing
