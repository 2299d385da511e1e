"""Restore a pool onto the global mesh, merge with fixed weights, save (one or more processes);
then the same merge streamed to disk; then, with --search, a whole `recycle-jax search`.

Run by tests/test_multihost.py once per process (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_NUM_CPU_DEVICES set), and called in-process for the single-process
reference. The merges import only the checkpoint stack (no TF, no evosax) to start fast.
"""
import argparse
import sys

import jax
import numpy as np
import tree_helpers


def merge(pool_path: str, weights, output: str, model_axis: int = 8) -> None:
  from recycle_jax.checkpoint_io import pool_manifest
  from recycle_jax.checkpoint_io import checkpoints
  from recycle_jax.models import partitioning
  pool = pool_manifest.load_pool(pool_path)
  meta = checkpoints.validate_pool(pool)
  mesh = partitioning.make_mesh(model=model_axis)  # parameter dims sharded across hosts
  abstract = partitioning.with_shardings(
      meta.abstract, partitioning.param_shardings(meta.abstract, mesh))
  params = checkpoints.restore_pool(pool, abstract)
  alphas = np.asarray(weights, np.float32)
  merged, finite = jax.jit(tree_helpers.linear_checked)(alphas, params)
  assert bool(finite)
  checkpoints.save(output, merged, {"model": meta.model_config,
                                    "merge": {"weights": alphas.tolist(), "pool": pool.names}})


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--pool", required=True)
  p.add_argument("--weights", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--search", default=None,
                 help="JSON list of `recycle-jax search` arguments, run after the merges")
  args = p.parse_args(argv)
  from recycle_jax.runtime import multihost
  multihost.initialize()
  assert jax.process_count() > 1 and jax.device_count() == 8, jax.devices()
  weights = [float(w) for w in args.weights.split(",")]
  merge(args.pool, weights, args.output)
  from recycle_jax.checkpoint_io import checkpoints, pool_manifest
  from recycle_jax.merging import streaming  # process 0 writes, the others wait
  pool = pool_manifest.load_pool(args.pool)
  streaming.merge_to_disk(pool, checkpoints.validate_pool(pool), weights,
                          args.output + "_streaming", progress=False)
  if args.search:
    import json
    from recycle_jax import cli  # --distributed: already joined, so initialize() is a no-op
    assert cli.main(json.loads(args.search) + ["--distributed"]) == 0


if __name__ == "__main__":
  sys.exit(main())
