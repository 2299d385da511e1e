"""Two processes (4 CPU devices each, gloo) merge and save exactly as one process with 8;
the streaming merge works under them too."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import multihost_merge
import recycle_jax
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


def test_two_processes_merge_like_one(micro_pool, tmp_path):
  port, two = free_port(), str(tmp_path / "two_processes")
  args = [sys.executable, SCRIPT, f"--pool={micro_pool}",
          f"--weights={','.join(map(str, WEIGHTS))}", f"--output={two}"]
  procs = [subprocess.Popen(args, env=process_env(port, i), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    one = str(tmp_path / "one_process")
    multihost_merge.merge(micro_pool, WEIGHTS, one)  # meanwhile, here on 8 devices
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  a, meta_a = on_one_device(one)
  b, meta_b = on_one_device(two)
  assert meta_a == meta_b
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  streamed, _ = on_one_device(two + "_streaming")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(streamed)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert sorted(os.listdir(tmp_path)) == [  # and no temp dirs left
      "one_process", "two_processes", "two_processes_streaming"]
