"""Two processes (4 CPU devices each, gloo) merge, save and search exactly as one process
with 8; the streaming merge works under them too."""
import json
import os
import sys

import pytest

import multihost_merge
from conftest import search_args
from recycle_jax.checkpoint_io import checkpoints
from tools import compare_checkpoints, local_multihost

pytestmark = pytest.mark.slow  # `make test-slow` (CI); two processes cost ~2 min on 2 cores

WEIGHTS = (0.2, 0.3, 0.5)
SCRIPT = os.path.abspath(multihost_merge.__file__)


def on_one_device(path: str):
  """Arrays and custom metadata, wherever the checkpoint was sharded when written."""
  params, meta = checkpoints.restore_local(path)
  return params, meta.custom


@pytest.fixture(scope="module")
def two_processes(micro_pool, micro_search, tmp_path_factory):
  """Outputs of one 2-process run: the merge, the streamed merge and a search (the same
  arguments as `micro_search`), next to the 1-process merge made meanwhile."""
  tmp = tmp_path_factory.mktemp("multihost")
  two, searched = str(tmp / "two_processes"), tmp / "search"
  procs = local_multihost.launch(  # 2 processes x 4 CPU devices, one coordinator
      [sys.executable, SCRIPT, f"--pool={micro_pool}",
       f"--weights={','.join(map(str, WEIGHTS))}", f"--output={two}",
       f"--search={json.dumps(search_args(micro_pool, searched))}"])
  try:
    one = str(tmp / "one_process")
    multihost_merge.merge(micro_pool, WEIGHTS, one)  # meanwhile, here on 8 devices
    logs = [p.communicate(timeout=420)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return tmp


def test_two_processes_merge_like_one(two_processes):
  a, meta_a = on_one_device(str(two_processes / "one_process"))
  b, meta_b = on_one_device(str(two_processes / "two_processes"))
  assert meta_a == meta_b
  assert compare_checkpoints.compare(a, b) == []
  streamed, _ = on_one_device(str(two_processes / "two_processes_streaming"))
  assert compare_checkpoints.compare(streamed, a, atol=1e-7, rtol=1e-6) == []
  assert sorted(os.listdir(two_processes)) == [  # and no temp dirs left
      "one_process", "search", "two_processes", "two_processes_streaming"]


def _result(workdir) -> dict:
  res = json.load(open(workdir / "results.json"))
  res.pop("figures", None)  # paths under the workdir
  res["config"].pop("search_wall_s", None)  # a wall-clock time: differs between any two runs
  return res


def test_two_processes_search_like_one(two_processes, micro_search):
  """The whole search (every candidate, the baselines, the Pareto sweep, the best merge)
  is the same on 2 x 4 devices as on 1 x 8."""
  two, one = _result(two_processes / "search"), _result(micro_search)
  ran = two.pop("runtime"), one.pop("runtime")  # the hardware each ran on
  assert [(r["process_count"], r["device_count"], r["backend"]) for r in ran] == [
      (2, 8, "cpu"), (1, 8, "cpu")]
  assert [h["weights"] for h in two["history"]] == [h["weights"] for h in one["history"]]
  assert two == one
  a, _ = on_one_device(str(micro_search / "merged"))
  b, _ = on_one_device(str(two_processes / "search" / "merged"))
  assert compare_checkpoints.compare(a, b) == []
  assert open(two_processes / "search" / "config.gin").read() == \
      open(micro_search / "config.gin").read().replace(str(micro_search), str(two_processes / "search"))
