"""Inputs are only read: every pool file is byte-for-byte and mtime unchanged after merge,
eval and search; and nothing is ever unpickled (in the source, and at run time)."""
import _pickle
import os
import pickle
import re

import evosax.algorithms  # noqa: F401 (it subclasses pickle.Unpickler at import, unused:
import pytest              # imported before the patch below, which catches every *call*)

from recycle_jax import cli
from reliability_util import ROOT, TASKS, pool_dir, pool_paths, snapshot, tiny_search_args
from reliability_util import tiny_pool  # noqa: F401 fixture

UNSAFE = re.compile(r"\b(c?pickle|dill|joblib|shelve|marshal)\b|allow_pickle\s*=\s*True|"
                    r"torch\.load|(np|numpy)\.load\(|read_pickle|weights_only\s*=\s*False")


@pytest.fixture(scope="module")
def runs(tiny_pool, tmp_path_factory):
  """Pool snapshots around a merge, an eval and a search run with unpickling disabled."""
  tmp = tmp_path_factory.mktemp("readonly")
  before = snapshot(pool_dir(tiny_pool))

  def refuse(*args, **kwargs):
    raise AssertionError("something was unpickled")
  with pytest.MonkeyPatch.context() as mp:
    for module in (pickle, _pickle):
      for name in ("load", "loads", "Unpickler"):
        mp.setattr(module, name, refuse)
    codes = [
        cli.main(["merge", f"--pool={tiny_pool}", "--weights=1,1,2",
                  f"--output={tmp / 'merged'}"]),
        cli.main(["eval", f"--checkpoint={pool_paths(tiny_pool)['a']}", f"--tasks={TASKS[0]}",
                  "--max_examples=8", f"--output={tmp / 'scores.json'}"]),
        cli.main(tiny_search_args(tiny_pool, tmp / "run", budget=14)),
    ]
  return codes, before, snapshot(pool_dir(tiny_pool)), tmp


def test_merge_eval_and_search_run_without_unpickling(runs):
  codes, _, _, tmp = runs
  assert codes == [0, 0, 0]
  assert (tmp / "merged").is_dir() and (tmp / "run" / "merged").is_dir()


def test_inputs_are_never_modified(runs):
  _, before, after, _ = runs
  assert after == before


def test_package_source_never_loads_pickle():
  package = os.path.join(ROOT, "recycle_jax")
  hits = []
  for name in sorted(os.listdir(package)):
    if name.endswith(".py"):
      with open(os.path.join(package, name)) as f:
        hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                 if UNSAFE.search(line)]
  assert not hits, "\n".join(hits)
