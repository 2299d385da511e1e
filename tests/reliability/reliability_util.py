"""Helpers of the reliability tests: the tiny pool, CLI runners, file snapshots.

The pool is random-init checkpoints of a tiny model (seconds to write, no training); its
tasks are multiple choice, so scores differ between merges without any training.
"""
import functools
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax import cli
from recycle_jax.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = transformer.ModelConfig(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)
TASKS = ["rj_knowledge", "rj_reasoning"]


def write_checkpoint(path, seed=0, cfg=CFG, mutate=None) -> str:
  params = transformer.init_params(cfg, jax.random.key(seed))
  params = jax.tree.map(np.asarray, params)
  if mutate:
    params = mutate(params)
  checkpoints.save(str(path), params, {"model": cfg.to_dict()})
  return str(path)


def write_manifest(path, checkpoints_by_name: dict) -> str:
  """pool.json at `path` listing {name: checkpoint path}."""
  items = [{"name": n, "path": str(p)} for n, p in checkpoints_by_name.items()]
  with open(path, "w") as f:
    json.dump({"checkpoints": items}, f)
  return str(path)


# ----------------------------------------------------------------------------- fixtures
# (imported by the test modules: a conftest.py here would shadow tests/conftest.py as
# `conftest` on sys.path, breaking `from conftest import ...` there)

def _poison(value):
  def mutate(params):
    k = params["embed"]["embedding"].copy()
    k[3, 5] = value
    return {**params, "embed": {**params["embed"], "embedding": k}}
  return mutate


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory) -> str:
  """pool.json of 3 random-init checkpoints a, b, c."""
  return _tiny_pool(tmp_path_factory.getbasetemp())


@functools.lru_cache(None)  # once per session, whichever module asks first
def _tiny_pool(base) -> str:
  root = base / "tiny_pool"
  paths = {n: write_checkpoint(root / n, seed=i) for i, n in enumerate("abc")}
  return write_manifest(root / "pool.json", paths)


@pytest.fixture(scope="session")
def odd_checkpoints(tmp_path_factory) -> dict:
  """Checkpoints that do not belong in the tiny pool: {kind: path}."""
  return _odd_checkpoints(tmp_path_factory.getbasetemp())


@functools.lru_cache(None)
def _odd_checkpoints(base) -> dict:
  root = base / "odd"
  return {
      "nan": write_checkpoint(root / "nan", 7, mutate=_poison(np.nan)),
      "inf": write_checkpoint(root / "inf", 8, mutate=_poison(np.inf)),
      "wide": write_checkpoint(root / "wide", 9, transformer.ModelConfig(
          **{**CFG.to_dict(), "d_ff": 48})),
      "half": write_checkpoint(root / "half", 10, mutate=lambda p: jax.tree.map(
          lambda x: x.astype(np.float16), p)),
      "extra": write_checkpoint(root / "extra", 11, mutate=lambda p: {
          **p, "extra": {"bias": np.zeros(4, np.float32)}}),
  }


@pytest.fixture
def no_array_reads(monkeypatch):
  """Fails the test if any checkpoint array is read (bad input must be caught first)."""
  def refuse(*a, **k):
    raise AssertionError("checkpoint arrays were read before the input was rejected")
  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refuse)


def pool_dir(pool_json: str) -> str:
  return os.path.dirname(pool_json)


def pool_paths(pool_json: str) -> dict:
  return {e.name: e.path for e in pool_manifest.load_pool(pool_json).entries}


def tiny_search_args(pool: str, workdir, *extra, budget: int = 28) -> list[str]:
  """A quick search: N=3 gives population 7, so budget 28 is 4 generations."""
  return ["search", f"--workdir={workdir}", f"--gin_bindings=Experiment.pool={str(pool)!r}",
          f"--gin_bindings=Experiment.tasks={TASKS!r}",
          "--gin_bindings=Experiment.max_examples=8",
          f"--gin_bindings=SearchConfig.budget={budget}", *extra]


# ----------------------------------------------------------------------------- files

def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def snapshot(*roots) -> dict:
  """{path: (size, mtime, sha256)} of every file, {dir: (mtime, entries)} of every dir."""
  out = {}
  for root in roots:
    for dirpath, dirnames, files in os.walk(root):
      out[dirpath] = (os.stat(dirpath).st_mtime_ns, sorted(dirnames + files))
      for f in files:
        p = os.path.join(dirpath, f)
        st = os.stat(p)
        out[p] = (st.st_size, st.st_mtime_ns, _sha256(p))
  return out


def partials(path) -> list[str]:
  """Temp dirs a writer of `path` leaves while it works (or when killed)."""
  return glob.glob(f"{path}.partial-*")


# ----------------------------------------------------------------------------- the CLI

def assert_rejected(capsys, args, *needles, untouched=(), absent=()) -> str:
  """The CLI exits 2 with one `error: what (where); how to fix` line and changes nothing."""
  before = snapshot(*untouched)
  assert cli.main([str(a) for a in args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  line = err[0]
  assert "(" in line and "; " in line, f"no where or no fix: {line}"
  for n in needles:
    assert n in line, f"{n!r} not in {line!r}"
  assert snapshot(*untouched) == before, "an input or existing output was changed"
  for p in absent:
    assert not os.path.exists(p), f"{p} was written"
    assert not partials(p), f"temp dirs of {p} were left"
  return line


def cli_env(tmp_path) -> dict:
  """Environment of a CLI subprocess; its compilation cache is shared by one test's runs."""
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
              TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore::DeprecationWarning",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def start_cli(args, tmp_path, log_name: str) -> subprocess.Popen:
  """`python -m recycle_jax.cli ARGS` in the background; stdout+stderr to tmp_path/log_name."""
  log = open(tmp_path / log_name, "w")
  proc = subprocess.Popen([sys.executable, "-m", "recycle_jax.cli", *map(str, args)],
                          cwd=ROOT, env=cli_env(tmp_path), stdout=log,
                          stderr=subprocess.STDOUT)
  log.close()
  return proc


def run_cli(args, tmp_path, log_name: str, timeout: float = 600) -> tuple[int, str]:
  proc = start_cli(args, tmp_path, log_name)
  proc.wait(timeout)
  return proc.returncode, (tmp_path / log_name).read_text()


def wait_for(cond, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.005):
  """Polls cond() until truthy and returns it; fails if proc exits or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    got = cond()
    if got:
      return got
    if proc.poll() is not None:
      return None
    time.sleep(poll)
  proc.kill()
  pytest.fail(f"timed out after {timeout}s waiting for {cond}")
