"""SIGKILL while `recycle-jax merge` writes: nothing at the destination; a rerun succeeds."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax import cli
from reliability_util import partials, pool_dir, pool_paths, snapshot, start_cli, wait_for
from reliability_util import tiny_pool  # noqa: F401 fixture

WEIGHTS = [1.0, 2.0, 5.0]


def test_sigkill_while_writing_leaves_no_checkpoint_and_a_rerun_succeeds(tiny_pool, tmp_path):
  pool_before = snapshot(pool_dir(tiny_pool))
  out = tmp_path / "merged"
  args = ["merge", f"--pool={tiny_pool}", f"--weights={','.join(map(str, WEIGHTS))}",
          f"--output={out}"]
  # The writer works in `out.partial-*` for seconds here; kill it as soon as that appears.
  # Should a run ever finish first, the output is complete: remove it and try again.
  for attempt in range(3):
    proc = start_cli(args, tmp_path, f"killed_{attempt}.log")
    if wait_for(lambda: partials(out), proc):
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL and not out.exists():
      break
    shutil.rmtree(out, ignore_errors=True)
  else:
    pytest.fail("the writer was never killed mid-write")
  assert partials(out), "the kill should have left the writer's temp dir behind"
  assert not out.exists()

  assert cli.main(args) == 0  # cleans up what the killed writer left
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]
  meta = checkpoints.read_metadata(str(out))
  got = checkpoints.restore(str(out), meta.abstract)
  pool = [checkpoints.restore(p, meta.abstract) for p in pool_paths(tiny_pool).values()]
  alphas = np.asarray(WEIGHTS) / sum(WEIGHTS)
  want = jax.tree.map(lambda *xs: sum(a * np.asarray(x) for a, x in zip(alphas, xs)), *pool)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert snapshot(pool_dir(tiny_pool)) == pool_before
