"""Out-of-core linear merge: leaf by leaf, block by block, straight from the checkpoint files.

Resident memory is set by the budget, not by N or the model size: a block (a slice of one
parameter along axis 0, or along the axis its stored chunks split) is read from each
checkpoint in turn and added into a float32 accumulator while the next reads are already
in flight, so only a few blocks are held at once. NaN/Inf is caught on the accumulated
block (it reaches the sum from any input) and only then traced to its checkpoint, so the
normal path makes no extra pass.

Arrays are read and written with tensorstore on Orbax's on-disk layout (zarr arrays in an
OCDBT database); the few Orbax JSON files are derived from the first checkpoint's, so the
result restores with `checkpoints.restore` like any checkpoint `checkpoints.save` writes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from recycle_jax import checkpoints
from recycle_jax.errors import UserError, check
from recycle_jax.partitioning import path_str

ACC_BYTES = 4  # float32 accumulator
PREFETCH = 2  # reads in flight (on as many threads) ahead of the one being added
# Resident at the peak, in blocks (measured, benchmarks/merge_throughput.py): the
# accumulator, the term being added, the input in hand, PREFETCH reads each decoded then
# copied by tensorstore, a write group filling and one committing.
BLOCKS_IN_BUDGET = 8


@dataclasses.dataclass(frozen=True)
class Leaf:
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  write_shape: tuple[int, ...]  # stored chunk shape in the first checkpoint

  @property
  def name(self) -> str:  # Orbax's parameter name, also the array's path on disk
    return ".".join(self.keys)

  @property
  def path(self) -> str:  # as everywhere else in recycle_jax (messages, rules)
    return "/".join(self.keys)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def axis(self) -> int:
    """The axis blocks slice: 0, unless the stored chunks split another axis only (a
    parameter saved sharded over columns), so a block never needs a sliver of a chunk."""
    if not self.shape or self.write_shape[0] < self.shape[0]:
      return 0
    split = [d for d, (n, c) in enumerate(zip(self.shape, self.write_shape)) if c < n]
    return split[0] if split else 0


# ----------------------------------------------------------------------------- planning

def leaves_of(abstract, write_shapes: dict[str, Sequence[int]]) -> list[Leaf]:
  """Leaves of a metadata tree, with stored chunk shapes (`write_shapes` by Orbax name)."""
  out = []
  for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    keys = tuple(path_str(p).split("/"))
    shape = tuple(x.shape)
    ws = write_shapes.get(".".join(keys))
    ws = tuple(ws) if ws and len(ws) == len(shape) else shape
    out.append(Leaf(keys, shape, np.dtype(x.dtype), ws))
  return out


def block_size(leaf: Leaf, max_bytes: int) -> int:
  """Length of a block along `leaf.axis`: whole stored chunks when they fit `max_bytes`
  of float32 (a block then decodes only chunks it needs whole), else what fits (>= 1)."""
  if not leaf.shape:
    return 1
  n = max(1, leaf.shape[leaf.axis])
  slab = ACC_BYTES * math.prod(leaf.shape) // n  # bytes of one index along the axis
  fit = max(1, max_bytes // max(slab, 1))
  chunk = max(1, min(leaf.write_shape[leaf.axis], n))
  return min(n, fit // chunk * chunk if chunk <= fit else fit)


def blocks(leaf: Leaf, size: int) -> list[tuple]:
  """Indices covering the leaf: `()` for a scalar, else slices of `size` along its axis."""
  if not leaf.shape:
    return [()]
  n, lead = leaf.shape[leaf.axis], (slice(None),) * leaf.axis
  return ([lead + (slice(s, min(s + size, n)),) for s in range(0, n, size)]
          or [lead + (slice(0, 0),)])


def chunk_shape(leaf: Leaf, size: int) -> list[int]:
  """Output chunks are the blocks, so every write fills whole chunks."""
  shape = list(leaf.shape)
  if shape:
    shape[leaf.axis] = max(1, size)
  return [max(1, d) for d in shape]


# ----------------------------------------------------------------------------- storage

def read_json(ckpt_dir: str, name: str) -> dict | None:
  path = os.path.join(ckpt_dir, name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _param_name(entry: dict) -> str:
  return ".".join(str(k["key"]) for k in entry["key_metadata"])


def write_shapes(tree_meta: dict | None) -> dict[str, list[int]]:
  if not tree_meta:
    return {}
  return {_param_name(e): e.get("value_metadata", {}).get("write_shape")
          for e in tree_meta.get("tree_metadata", {}).values()}


def array_spec(ckpt_dir: str, name: str, tree_meta: dict | None = None) -> dict:
  """Tensorstore spec of one array as Orbax stores it (OCDBT + zarr unless told else)."""
  tree_meta = tree_meta or {}
  base = os.path.abspath(ckpt_dir)
  kv = ({"driver": "ocdbt", "base": f"file://{base}/", "path": f"{name}/"}
        if tree_meta.get("use_ocdbt", True) else
        {"driver": "file", "path": os.path.join(base, name) + "/"})
  return {"driver": "zarr3" if tree_meta.get("use_zarr3", False) else "zarr", "kvstore": kv}


def create_arrays(out_dir: str, leaves: Sequence[Leaf], chunks: dict[str, list[int]],
                  ctx: ts.Context) -> dict[str, ts.TensorStore]:
  """Empty output arrays, created in one commit."""
  txn = ts.Transaction()
  out = {leaf.name: ts.open(output_spec(out_dir, leaf, chunks[leaf.name]), create=True,
                            dtype=ts.dtype(leaf.dtype.name), shape=leaf.shape,
                            transaction=txn, context=ctx).result() for leaf in leaves}
  txn.commit_sync()
  return out


def output_spec(out_dir: str, leaf: Leaf, chunks: list[int]) -> dict:
  """A zarr array like Orbax writes (zstd, every chunk stored)."""
  spec = array_spec(out_dir, leaf.name)
  spec["metadata"] = {"chunks": chunks, "compressor": {"id": "zstd", "level": 1}}
  spec["store_data_equal_to_fill_value"] = True
  return spec


def orbax_json(tree_meta: dict, ckpt_meta: dict | None, custom: dict,
               chunks: dict[str, list[int]]) -> dict[str, dict]:
  """`_METADATA` and `_CHECKPOINT_METADATA` of the merged checkpoint: the first input's
  tree (same structure, shapes, dtypes), with our chunking, storage format and metadata."""
  tree = json.loads(json.dumps(tree_meta))
  tree.update(use_ocdbt=True, use_zarr3=False, custom_metadata=None)
  for entry in tree.get("tree_metadata", {}).values():
    vm = entry.setdefault("value_metadata", {})
    if vm.get("write_shape"):
      vm["write_shape"] = chunks[_param_name(entry)]
  now = time.time_ns()
  ckpt = {**(ckpt_meta or {}), "metrics": {}, "performance_metrics": {},
          "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
          "custom_metadata": {checkpoints.META_KEY: custom}}
  return {"_METADATA": tree, "_CHECKPOINT_METADATA": ckpt}


# ----------------------------------------------------------------------------- pipeline

def prefetched(fn: Callable, items: Iterable, depth: int | None = None) -> Iterator:
  """fn(item) for each item in order, computed up to `depth` items ahead on as many
  reader threads."""
  depth = depth or PREFETCH
  with concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="merge-read") as ex:
    queue = collections.deque()
    for item in items:
      queue.append(ex.submit(fn, item))
      if len(queue) > depth:
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()


class Writes:
  """Writes grouped into transactions of about `limit` bytes, so the output database gets
  one commit (and fsync) per group, not per array; one group commits while the next fills."""

  def __init__(self, limit: int):
    self.limit, self.txn, self.bytes, self.committing = limit, ts.Transaction(), 0, None

  def write(self, store: ts.TensorStore, index, array: np.ndarray) -> None:
    store.with_transaction(self.txn)[index].write(array).result()
    self.bytes += array.nbytes
    if self.bytes >= self.limit:
      self.flush()

  def flush(self) -> None:
    if self.committing is not None:
      self.committing.result()
    self.committing, self.txn, self.bytes = self.txn.commit_async(), ts.Transaction(), 0

  def finish(self) -> None:
    self.flush()
    self.committing.result()

  def abort(self) -> None:
    """Drops what is not committed and waits for a commit in flight (it writes files)."""
    self.txn.abort()
    if self.committing is not None:
      try:
        self.committing.result()
      except Exception:  # the merge is failing anyway; its error is the one to report
        pass


def accumulate(acc: np.ndarray | None, alpha: np.float32, x: np.ndarray) -> np.ndarray:
  """acc + alpha * x in float32, as `merging.linear` computes it. Consumes x and acc: both
  are updated in place, as fresh temporaries cost page faults that show in throughput."""
  term = x.astype(np.float32, copy=not x.flags.writeable)
  term *= alpha
  if acc is None:
    return term
  acc += term
  return acc


def nonfinite_error(pool: checkpoints.Pool, leaf: Leaf, index, read: Callable) -> UserError:
  """Names the checkpoint with NaN/Inf in this block (re-reads it: the error path only)."""
  for i, e in enumerate(pool.entries):
    if not np.all(np.isfinite(read((leaf, index, i)))):
      return UserError(f"parameter {leaf.path!r} has NaN or Inf values",
                       f"checkpoint {e.name!r} at {e.path}",
                       "repair or drop that checkpoint; nothing was written")
  return UserError(f"the merge of parameter {leaf.path!r} overflows float32", "--weights",
                   "check the checkpoints' magnitudes; nothing was written")


def merged_custom(pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
                  alphas: Sequence[float]) -> dict:
  """The custom metadata the in-memory merge writes, built without loading parameters."""
  return {"model": meta.model_config,
          "merge": {"method": "linear", "weights": [float(a) for a in alphas],
                    "pool": pool.names}}


def merge_into(tmp: str, pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
               alphas: Sequence[float], memory_budget_mb: float, progress: bool) -> None:
  """Writes the merged checkpoint into the fresh directory `tmp`."""
  src = pool.entries[0].path
  tree_meta = read_json(src, "_METADATA")
  check(tree_meta is not None and "tree_metadata" in tree_meta,
        "checkpoint has no Orbax _METADATA file", f"checkpoint {pool.entries[0].name!r} at {src}",
        "streaming needs checkpoints written by Orbax >= 0.5; merge without --streaming")
  input_meta = [read_json(e.path, "_METADATA") for e in pool.entries]
  block_bytes = max(1, int(memory_budget_mb * 2**20) // BLOCKS_IN_BUDGET)
  leaves = leaves_of(meta.abstract, write_shapes(tree_meta))
  sizes = {leaf.name: block_size(leaf, block_bytes) for leaf in leaves}
  chunks = {leaf.name: chunk_shape(leaf, sizes[leaf.name]) for leaf in leaves}
  plan = [(leaf, index) for leaf in leaves for index in blocks(leaf, sizes[leaf.name])]
  ctx = ts.Context()

  @functools.lru_cache(maxsize=2 * len(pool))  # this leaf's and the next's N arrays
  def open_input(i: int, name: str) -> ts.TensorStore:
    spec = array_spec(pool.entries[i].path, name, input_meta[i])
    return ts.open(spec, read=True, context=ctx).result()

  def read(item) -> np.ndarray:
    leaf, index, i = item
    return np.asarray(open_input(i, leaf.name)[index].read().result())

  weights = [np.float32(a) for a in alphas]
  writes = Writes(block_bytes)
  total = sum(leaf.nbytes for leaf in leaves) * len(pool)
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress)
  reads = prefetched(read, ((leaf, index, i) for leaf, index in plan
                            for i in range(len(pool))))
  out = create_arrays(tmp, leaves, chunks, ctx)
  try:
    for leaf, index in plan:
      acc = None
      for w in weights:
        x = next(reads)
        acc = accumulate(acc, w, x)
        bar.update(x.nbytes)
        del x
      if not np.all(np.isfinite(acc)):  # one check per block, on the sum: any NaN/Inf in
        raise nonfinite_error(pool, leaf, index, read)  # an input reaches it (0*inf is NaN)
      writes.write(out[leaf.name], index, acc.astype(leaf.dtype, copy=False))
    writes.finish()
  except BaseException:
    writes.abort()
    raise
  finally:
    reads.close()
    bar.close()
  write_orbax_files(tmp, src, tree_meta, merged_custom(pool, meta, alphas), chunks)


def write_orbax_files(out_dir: str, src: str, tree_meta: dict, custom: dict,
                      chunks: dict[str, list[int]]) -> None:
  files = orbax_json(tree_meta, read_json(src, "_CHECKPOINT_METADATA"), custom, chunks)
  for name, data in files.items():
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(data, f)
  if os.path.isfile(os.path.join(src, "_sharding")):  # default placement when restored
    shutil.copy(os.path.join(src, "_sharding"), os.path.join(out_dir, "_sharding"))


def merge_to_disk(pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
                  alphas: Sequence[float], output: str, memory_budget_mb: float = 256,
                  overwrite: bool = False, progress: bool = True) -> None:
  """Linear merge `sum_i alphas[i] * checkpoint_i` written to `output`, out of core.

  `meta` is `checkpoints.validate_pool(pool)`. Peak memory above the runtime stays within
  about 1.5x `memory_budget_mb` (plus ~20 MB of tensorstore threads and buffers), whatever
  N and the model size; a parameter stored as one chunk larger than the budget (saved
  unsharded) is still decoded whole by tensorstore, once per block. Raises UserError
  naming the checkpoint and parameter on NaN/Inf, leaving nothing at `output`. With
  several processes, process 0 writes and the others wait.
  """
  check(memory_budget_mb > 0, f"memory budget must be positive, got {memory_budget_mb}",
        "--memory_budget_mb")
  output = os.path.abspath(output)
  checkpoints.check_output(output, pool.paths, overwrite)
  tmp = checkpoints.temp_sibling(output)
  error = None
  if jax.process_index() == 0:
    try:
      os.makedirs(tmp)
      merge_into(tmp, pool, meta, alphas, memory_budget_mb, progress)
    except BaseException as e:
      shutil.rmtree(tmp, ignore_errors=True)
      error = e
  if not _all_ok(error is None):
    raise error or UserError("the streaming merge failed on process 0", "--streaming")
  checkpoints.commit(tmp, output, overwrite)


def _all_ok(ok: bool) -> bool:
  """Process 0's outcome, on every process (so none waits forever on a failed writer)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
