"""Installing recycle_jax: setup.py's ranges admit the lock file's pins and cover every
third-party import; `pip install .` resolves to exactly the lock (slow: asks the index);
a fresh venv installs it and imports it (slow: the whole stack)."""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCKS = ("requirements.txt", "requirements-test.txt")
CONSTRAINTS = [a for f in LOCKS for a in ("-c", os.path.join(ROOT, f))]


def _lock() -> dict[str, str]:
  pins = {}
  for f in LOCKS:
    for line in open(os.path.join(ROOT, f)):
      line = line.split("#")[0].strip()
      if line:
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version
  return pins


def _setup() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
  """setup.py's install_requires and extras_require, as setup() receives them."""
  import runpy
  import setuptools
  seen = {}
  real, setuptools.setup = setuptools.setup, lambda **kw: seen.update(kw)
  try:
    runpy.run_path(os.path.join(ROOT, "setup.py"))
  finally:
    setuptools.setup = real
  return ([Requirement(r) for r in seen["install_requires"]],
          {k: [Requirement(r) for r in v] for k, v in seen["extras_require"].items()})


def test_ranges_admit_the_locked_versions():
  pins = _lock()
  core, extras = _setup()
  assert len(core) >= 15 and not any(str(r.specifier).startswith("==") for r in core)
  for r in core + [r for k in ("hf", "test") for r in extras[k]]:
    name = canonicalize_name(r.name)
    assert name in pins, f"{r.name} is a direct dependency but not in the lock file"
    assert r.specifier.contains(pins[name]), f"{r} excludes the locked {pins[name]}"
  for accel in ("tpu", "cuda12"):  # jax's own extras, in jax's range
    [r] = extras[accel]
    assert r.name == "jax" and r.extras == {accel} and r.specifier.contains(pins["jax"])


def _third_party_imports() -> set[str]:
  names = set()
  for d, _, files in os.walk(os.path.join(ROOT, "recycle_jax")):
    for f in files:
      if f.endswith(".py"):
        for node in ast.walk(ast.parse(open(os.path.join(d, f)).read())):
          if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
  own = {f[:-3] for _, _, files in os.walk(os.path.join(ROOT, "recycle_jax")) for f in files
         if f.endswith(".py")}  # the sandbox's child imports its siblings by name
  return {n for n in names if n not in sys.stdlib_module_names and n != "recycle_jax"
          and n not in own}


def test_every_import_is_a_declared_dependency():
  """Each third-party module recycle_jax imports comes from a distribution setup.py names
  (directly, or as the documented provider: seqio brings tensorflow-text)."""
  core, extras = _setup()
  declared = {canonicalize_name(r.name) for r in core + [r for v in extras.values() for r in v]}
  dists = importlib.metadata.packages_distributions()
  missing = {}
  for module in _third_party_imports():
    providers = {canonicalize_name(d) for d in dists.get(module, [module])}
    if not providers & declared:
      missing[module] = sorted(providers)
  assert not missing, f"imported but not in setup.py: {missing}"


@pytest.mark.slow
def test_pip_install_resolves_to_the_lock(tmp_path):
  """pip's resolver, from scratch (--ignore-installed), on `.` with the lock as
  constraints: it must succeed and pick exactly the locked version of everything."""
  report = tmp_path / "report.json"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
       "--report", str(report), *CONSTRAINTS, f"{ROOT}[hf,test]"],
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pins = _lock()
  got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
         for i in json.loads(report.read_text())["install"]}
  got.pop("recycle-jax")
  unpinned = sorted(set(got) - set(pins))
  assert not unpinned, f"resolved but not in the lock: {unpinned}"
  # (== ignores a local label: torch's CPU wheel is 2.13.0+cpu for the pin 2.13.0)
  assert {n: v for n, v in got.items() if not SpecifierSet(f"=={pins[n]}").contains(v)} == {}
  assert {"jax", "jaxlib", "flax", "orbax-checkpoint", "evosax", "seqio"} <= set(got)


@pytest.mark.slow
def test_fresh_venv_installs_and_imports(tmp_path):
  """`pip install .` (not editable) into a new venv, then the CLI and the main modules
  import from the installed copy, outside the checkout."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  proc = subprocess.run([py, "-m", "pip", "install", "--quiet", *CONSTRAINTS, ROOT],
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  code = ("import recycle_jax, recycle_jax.cli, recycle_jax.plan, recycle_jax.search.loop, "
          "recycle_jax.tasks.embedded; print(recycle_jax.__file__)")
  proc = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert str(venv) in proc.stdout  # the installed copy, not the checkout
  proc = subprocess.run([str(venv / "bin" / "recycle-jax"), "--help"], capture_output=True,
                        text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0 and "plan" in proc.stdout
