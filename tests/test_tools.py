"""tools/: the checkpoint comparison and the local multi-process launcher."""
import os
import subprocess
import sys

import numpy as np

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints
from tools import compare_checkpoints, local_multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paths(micro_pool):
  return [e.path for e in pool_manifest.load_pool(micro_pool).entries]


def test_compare_checkpoints_exit_status_and_differences(micro_pool, capsys):
  a, b = _paths(micro_pool)[:2]
  assert compare_checkpoints.main([a, a]) == 0
  assert compare_checkpoints.main([a, b]) == 1
  out = capsys.readouterr().out
  assert "max |a - b|" in out and out.strip().endswith("different (atol 0, rtol 0)")
  assert compare_checkpoints.main([a, a + "_missing"]) == 2


def test_compare_sees_one_changed_element_and_respects_tolerance(micro_pool):
  params, _ = checkpoints.restore_local(_paths(micro_pool)[0])
  other = {k: v for k, v in params.items()}
  leaf = other["final_norm"]["scale"].copy()
  leaf[3] += 1e-3
  other["final_norm"] = {"scale": leaf}
  diffs = compare_checkpoints.compare(params, other)
  assert len(diffs) == 1 and diffs[0].startswith("final_norm/scale:")
  assert compare_checkpoints.compare(params, other, atol=2e-3) == []
  nan = dict(other, final_norm={"scale": np.full_like(leaf, np.nan)})
  assert compare_checkpoints.compare(params, nan, atol=1e9)  # NaN is never within tolerance


def test_local_multihost_gives_each_process_its_id_and_devices():
  env0 = local_multihost.process_env(1234, 0, 3, 2, base={"XLA_FLAGS": "x", "A": "b"})
  assert "XLA_FLAGS" not in env0 and env0["A"] == "b"
  assert (env0["JAX_NUM_PROCESSES"], env0["JAX_PROCESS_ID"], env0["JAX_NUM_CPU_DEVICES"]) == \
      ("3", "0", "2")
  res = subprocess.run([sys.executable, "tools/local_multihost.py", "--processes=2"],
                       cwd=ROOT, capture_output=True, text=True)
  assert res.returncode == 2 and res.stderr.startswith("error: nothing to run")
