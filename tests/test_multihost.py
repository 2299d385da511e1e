"""Two processes (4 CPU devices each, gloo) merge, save and search exactly as one process
with 8; the streaming merge works under them too."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multihost_merge
import recycle_jax
from conftest import search_args
from recycle_jax import checkpoints

WEIGHTS = (0.2, 0.3, 0.5)
SCRIPT = os.path.abspath(multihost_merge.__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(recycle_jax.__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(port: int, process_id: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 4 devices, not 8
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id), JAX_NUM_CPU_DEVICES="4",
             PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
  return env


def on_one_device(path: str):
  """Arrays and custom metadata, wherever the checkpoint was sharded when written."""
  meta = checkpoints.read_metadata(path)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          meta.abstract)
  return jax.tree.map(np.asarray, checkpoints.restore(path, abstract)), meta.custom


@pytest.fixture(scope="module")
def two_processes(micro_pool, micro_search, tmp_path_factory):
  """Outputs of one 2-process run: the merge, the streamed merge and a search (the same
  arguments as `micro_search`), next to the 1-process merge made meanwhile."""
  tmp = tmp_path_factory.mktemp("multihost")
  port, two, searched = free_port(), str(tmp / "two_processes"), tmp / "search"
  args = [sys.executable, SCRIPT, f"--pool={micro_pool}",
          f"--weights={','.join(map(str, WEIGHTS))}", f"--output={two}",
          f"--search={json.dumps(search_args(micro_pool, searched))}"]
  procs = [subprocess.Popen(args, env=process_env(port, i), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
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
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  streamed, _ = on_one_device(str(two_processes / "two_processes_streaming"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(streamed)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert sorted(os.listdir(two_processes)) == [  # and no temp dirs left
      "one_process", "search", "two_processes", "two_processes_streaming"]


def _result(workdir) -> dict:
  res = json.load(open(workdir / "results.json"))
  res.pop("figures", None)  # paths under the workdir
  return res


def test_two_processes_search_like_one(two_processes, micro_search):
  """The whole search (every candidate, the baselines, the Pareto sweep, the best merge)
  is the same on 2 x 4 devices as on 1 x 8."""
  two, one = _result(two_processes / "search"), _result(micro_search)
  assert [h["weights"] for h in two["history"]] == [h["weights"] for h in one["history"]]
  assert two == one
  a, _ = on_one_device(str(micro_search / "merged"))
  b, _ = on_one_device(str(two_processes / "search" / "merged"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert open(two_processes / "search" / "config.gin").read() == \
      open(micro_search / "config.gin").read().replace(str(micro_search), str(two_processes / "search"))
