"""The package's layering: each subpackage imports only the ones below it (function-local
imports included), and no module imports itself back through others (no cycles)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "recycle_jax"
# Low to high. A module may import its own package and those before it; the top-level
# modules (the entry points and the gin edge) may import every package.
ORDER = ("runtime", "models", "checkpoint_io", "merging", "evaluation", "tasks", "search",
         "reporting")


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(os.path.join(ROOT, PKG)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[int, str]]:
  """(line, module) of every import of this package, at any depth of the file."""
  found = []
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.startswith(PKG)]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.startswith(PKG):
      for a in node.names:  # `from pkg import module` imports the module
        sub = f"{node.module}.{a.name}"
        found.append((node.lineno, sub if sub in MODULES else node.module))
  return found


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER):
    return ORDER.index(parts[1]) if parts[1] in ORDER else len(ORDER)
  return len(ORDER)  # top level: cli, experiment, the gin edge, the user-facing paths


def test_every_subpackage_is_in_the_order():
  subpackages = {m.split(".")[1] for m in MODULES if m.count(".") >= 2}
  assert subpackages <= set(ORDER), f"add {subpackages - set(ORDER)} to ORDER"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_downward(module):
  upward = [f"line {line}: {target}" for line, target in _imports(MODULES[module])
            if _layer(target) > _layer(module) and _layer(module) < len(ORDER)]
  assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_cycles():
  graph = {m: {t for _, t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
  # A package's __init__ is imported by its submodules' imports; only module edges count.
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 1
    for t in graph[m]:
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack + [t])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, f"import cycles: {cycles}"


def test_each_package_says_what_it_holds():
  for name in ORDER:
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, PKG, name, "__init__.py")).read()))
    assert doc and "imports:" in doc.lower(), f"{name}/__init__.py: say what it holds and may import"
