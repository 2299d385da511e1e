"""SIGKILL during `recycle-jax search`, then `--resume`: exactly the uninterrupted result."""
import json
import os
import signal
import threading

import pytest

from recycle_jax import cli
from reliability_util import (pool_dir, run_cli, snapshot, start_cli, tiny_search_args,
                              wait_for)
from reliability_util import tiny_pool  # noqa: F401 fixture

pytestmark = pytest.mark.slow  # a search SIGKILLed and resumed: `make test-slow` (CI)

GENERATIONS = 4  # budget 28 / population 7


def _saved_steps(workdir) -> list[int]:
  """Finished Orbax steps of the search state (unfinished ones carry a tmp suffix)."""
  d = os.path.join(workdir, "search_state")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _outcome(workdir) -> dict:
  res = json.load(open(os.path.join(workdir, "results.json")))
  return {"history": [(h["kind"], h["weights"], h["fitness"], h["scores"])
                      for h in res["history"]],
          "search": res["methods"]["search"]}


def test_sigkill_mid_search_then_resume_gives_the_uninterrupted_result(tiny_pool, tmp_path):
  pool_before = snapshot(pool_dir(tiny_pool))
  killed, reference = tmp_path / "killed", tmp_path / "reference"
  args = tiny_search_args(tiny_pool, killed, "--gin_bindings=Experiment.save_merged=False")
  proc = start_cli(args, tmp_path, "killed.log")

  def kill_after_first_generation():  # a saved step > 0: some generations done, not all
    if wait_for(lambda: any(s > 0 for s in _saved_steps(killed)), proc):
      os.kill(proc.pid, signal.SIGKILL)
  killer = threading.Thread(target=kill_after_first_generation)
  killer.start()
  # Meanwhile, the same search uninterrupted, in this process.
  assert cli.main(tiny_search_args(tiny_pool, reference,
                                   "--gin_bindings=Experiment.save_merged=False")) == 0
  killer.join()
  assert proc.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
  assert 0 < max(_saved_steps(killed)) < GENERATIONS
  assert not (killed / "results.json").exists()

  rc, log = run_cli(args + ["--resume"], tmp_path, "resumed.log")
  assert rc == 0 and "resumed search at generation" in log, log
  got, want = _outcome(killed), _outcome(reference)
  assert len([h for h in want["history"] if h[0] == "search"]) == 7 * GENERATIONS
  assert got["history"] == want["history"]
  assert got["search"] == want["search"]
  assert snapshot(pool_dir(tiny_pool)) == pool_before
