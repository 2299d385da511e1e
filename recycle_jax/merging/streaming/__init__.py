"""Out-of-core linear merge: leaf by leaf, unit by unit, straight from the checkpoint files.

Resident memory is set by the budget, not by N or the model size: a unit (a run of one
stored chunk, or of a few chunks along one axis; see `unit_shape`) is read from each
checkpoint in turn and added into a float32 accumulator while the next reads are already
in flight, so only a few batches of units are held at once. NaN/Inf is caught on the
accumulated batch (it reaches the sum from any input) and only then traced to its
checkpoint, so the normal path makes no extra pass.

Inputs are Orbax's on-disk layouts (zarr arrays in an OCDBT database, or a file per
chunk). Uncompressed chunks are summed straight from the files' mapped pages (or read with
pread when `MAPPED` is off), located with the database's own dump
(`tensorstore.ocdbt.dump`); anything else (zstd, Orbax's default) is read through
tensorstore, whose decoding then sets the pace. The output is one OCDBT database like
Orbax's, chunked like the units; uncompressed, each unit's bytes are stored as its
chunk's value directly. The few Orbax JSON files are derived from the first
checkpoint's, so the result restores with `checkpoints.restore` like any checkpoint
`checkpoints.save` writes.

The package by concern: `plan` (leaves, units, batches), `layout` (Orbax's on-disk
format), `pipeline` (threaded reads and writes, writeback), `kernel` (the BLAS sum and the
process settings it runs under); this module drives them.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import queue
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.runtime import outputs
from recycle_jax.runtime import multihost, waits
from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.merging.streaming.kernel import accumulate, blas_single_threaded, gc_paused  # noqa: F401
from recycle_jax.merging.streaming.layout import array_spec, ocdbt_index, pieces, raw_chunks, read_json, write_orbax_files, write_shapes
from recycle_jax.merging.streaming.pipeline import PREFETCH, Mapped, NoSync, Output, Reader, Syncer, as_flat, drop_cached, prefetched
from recycle_jax.merging.streaming.plan import ACC_BYTES, Leaf, batches, crop, leaves_of, region, unit_shape, units

# Resident at the peak, in batches: PREFETCH + 2 read buffers (one being added, PREFETCH
# filling, one spare), two accumulators (one summing, one being written) and two batches
# of finished sums in the output's writes in flight (tensorstore's copies; see Output).
BLOCKS_IN_BUDGET = 8
# Uncompressed chunks are summed straight from the files' mapped pages (no copy into a
# buffer); False reads them with pread into the buffers instead.
MAPPED = True


def finite(acc: np.ndarray, ushape: Sequence[int], leaf: Leaf, batch: Sequence[tuple]) -> bool:
  """No NaN/Inf in the valid part of a batch (units at the edge carry padding)."""
  size = max(1, math.prod(ushape))
  regions = [region(leaf, ushape, o) for o in batch]
  if all(r.stop - r.start == u for r, u in zip(itertools.chain(*regions), ushape * len(batch))):
    return bool(np.isfinite(acc).all())
  return all(np.isfinite(acc[u * size:(u + 1) * size].reshape(ushape)[crop(ushape, r)]).all()
             for u, r in enumerate(regions))


def nonfinite_error(pool: pool_manifest.Pool, leaf: Leaf, ushape, batch, read: Callable) -> UserError:
  """Names the checkpoint with NaN/Inf in this batch (re-reads it: the error path only)."""
  for i, e in enumerate(pool.entries):
    x = read(i, leaf, ushape, batch).astype(np.float32)
    if not finite(x, ushape, leaf, batch):
      return UserError(f"parameter {leaf.path!r} has NaN or Inf values",
                       f"checkpoint {e.name!r} at {e.path}",
                       "repair or drop that checkpoint; nothing was written")
  return UserError(f"the merge of parameter {leaf.path!r} overflows float32", "--weights",
                   "check the checkpoints' magnitudes; nothing was written")


def merged_custom(pool: pool_manifest.Pool, meta: checkpoint_meta.CheckpointMeta,
                  alphas: Sequence[float]) -> dict:
  """The custom metadata the in-memory merge writes, built without loading parameters."""
  out = {"model": meta.model_config,
         "merge": {"method": "linear", "weights": [float(a) for a in alphas],
                   "pool": pool.names}}
  if meta.tokenizer is not None:  # the pool's tokenizer travels (files: merge_to_disk)
    out["vocabulary"] = meta.tokenizer.describe()
  hf = meta.custom.get(checkpoint_meta.META_KEY, {}).get("hf_config")
  if hf:
    out["hf_config"] = hf
  return out


@dataclasses.dataclass
class Plan:
  """What the merge reads and writes, from metadata: its leaves, each leaf's unit shape,
  and the batches of units summed at a time, within the memory budget."""
  src: str  # the first checkpoint: its Orbax files are the output's template
  tree_meta: dict
  input_meta: list
  leaves: list[Leaf]
  shapes: dict[str, tuple[int, ...]]  # leaf name -> unit shape (= output chunk shape)
  batches: list[tuple[Leaf, tuple[int, ...], list]]  # (leaf, unit shape, unit origins)
  block_bytes: int

  @classmethod
  def of(cls, pool: pool_manifest.Pool, meta: checkpoint_meta.CheckpointMeta,
         memory_budget_mb: float) -> "Plan":
    src = pool.entries[0].path
    tree_meta = read_json(src, "_METADATA")
    check(tree_meta is not None and "tree_metadata" in tree_meta,
          "checkpoint has no Orbax _METADATA file",
          f"checkpoint {pool.entries[0].name!r} at {src}",
          "streaming needs checkpoints written by Orbax >= 0.5; merge without --streaming")
    input_meta = [read_json(e.path, "_METADATA") for e in pool.entries]
    block_bytes = max(1, int(memory_budget_mb * 2**20) // BLOCKS_IN_BUDGET)
    leaves = leaves_of(meta.abstract, write_shapes(tree_meta))
    shapes = {leaf.name: unit_shape(leaf, block_bytes) for leaf in leaves}
    plan = [(leaf, shapes[leaf.name], b) for leaf in leaves
            for b in batches(leaf, shapes[leaf.name], block_bytes)]
    return cls(src, tree_meta, input_meta, leaves, shapes, plan, block_bytes)

  @property
  def elems(self) -> int:
    """Elements of the largest batch: the size of every buffer."""
    return max([len(b) * max(1, math.prod(u)) for _, u, b in self.batches], default=1)


class Inputs:
  """The pool's reads, into a fixed set of buffers (PREFETCH + 2: see BLOCKS_IN_BUDGET)."""

  def __init__(self, pool: pool_manifest.Pool, plan: Plan):
    self.reader = Reader(pool, plan.input_meta, ts.Context())
    itemsize = max([leaf.dtype.itemsize for leaf in plan.leaves] + [ACC_BYTES])
    self.free = queue.SimpleQueue()
    for _ in range(PREFETCH + 2):
      self.free.put(np.empty(plan.elems * itemsize, np.uint8))

  def read(self, item) -> np.ndarray | list | Mapped:
    """One batch of one checkpoint: item = (leaf, unit shape, origins, checkpoint index)."""
    leaf, ushape, batch, i = item
    n = len(batch) * max(1, math.prod(ushape))
    buf = self.free.get()
    x = self.reader.read(i, leaf, ushape, batch, buf.view(leaf.dtype)[:n], mapped=MAPPED)
    if not isinstance(x, np.ndarray):  # tensorstore's arrays or mapped pages: no buffer
      self.free.put(buf)
    return x

  def done(self, x) -> None:
    """A read has been added: its buffer (if it had one) is free again."""
    if isinstance(x, np.ndarray):
      self.free.put(x.base if x.base is not None else x)

  def fresh_read(self, i, leaf, ushape, batch) -> np.ndarray:
    """A batch in a buffer of its own, flat (the error path's re-read)."""
    n = len(batch) * max(1, math.prod(ushape))
    return as_flat(self.reader.read(i, leaf, ushape, batch, np.empty(n, leaf.dtype)), leaf,
                   ushape, batch, np.zeros(n, leaf.dtype))

  def inline(self, item) -> bool:
    """Mapped reads are views and a read-ahead hint: made on the summing thread."""
    return MAPPED and self.reader.raw(item[3], item[0]) is not None

  def close(self) -> None:
    self.reader.close()


def add(acc, w, x, out, leaf: Leaf, ushape, batch) -> np.ndarray:
  """accumulate() over a read: a flat buffer, mapped pieces (released after), or
  tensorstore's arrays unit by unit; acc None starts the sum in `out`."""
  if isinstance(x, np.ndarray):
    return accumulate(acc, w, x, out)
  first, acc = acc is None, out if acc is None else acc
  if isinstance(x, Mapped):
    for at, part, *_ in x.parts:
      view = acc[at:at + part.size]
      accumulate(None if first else view, w, part, view)
    x.release()
    return acc
  size = max(1, math.prod(ushape))
  for u, (o, part) in enumerate(zip(batch, x)):
    view = acc[u * size:(u + 1) * size].reshape(ushape)[crop(ushape, region(leaf, ushape, o))]
    accumulate(None if first else view, w, part, view)
  return acc


def sum_batches(plan: Plan, pool: pool_manifest.Pool, weights: Sequence[np.float32],
                inputs: Inputs, reads: Iterator, out: Output, bar) -> None:
  """Every batch: the weighted sum of its reads (one per checkpoint, in order), checked
  finite, written. Two accumulators take turns: one sums while the other's writes copy."""
  accs = collections.deque((np.empty(plan.elems, np.float32), []) for _ in range(2))
  for leaf, ushape, batch in plan.batches:
    acc, size = None, max(1, math.prod(ushape))
    spare, copying = accs.popleft()
    for f in copying:  # a write still copying from this buffer
      waits.result(f, "a write of the streaming merge")
    copying = []
    accs.append((spare, copying))
    for w in weights:
      x = next(reads)
      nbytes = sum(p.nbytes for p in x) if isinstance(x, list) else x.nbytes
      acc = add(acc, w, x, spare[:len(batch) * size], leaf, ushape, batch)
      inputs.done(x)
      bar.update(nbytes)
      del x
    if not finite(acc, ushape, leaf, batch):  # one check per batch, on the sum: any
      raise nonfinite_error(pool, leaf, ushape, batch, inputs.fresh_read)  # NaN/Inf reaches it
    for u, origin in enumerate(batch):
      f = out.write(leaf, ushape, origin, acc[u * size:(u + 1) * size])
      if f is not None:
        copying.append(f)


def merge_into(tmp: str, pool: pool_manifest.Pool, meta: checkpoint_meta.CheckpointMeta,
               alphas: Sequence[float], memory_budget_mb: float, progress: bool,
               compress: bool = False, fsync: bool = True) -> dict:
  """Writes the merged checkpoint into the fresh directory `tmp`; returns counts of units
  read raw and through tensorstore."""
  plan = Plan.of(pool, meta, memory_budget_mb)
  inputs = Inputs(pool, plan)
  syncer = Syncer(tmp, 4 * plan.block_bytes) if fsync else NoSync()
  total = sum(leaf.nbytes for leaf in plan.leaves) * len(pool)
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress)
  # Mapped reads are made on this thread, as handing them to a reader thread costs more
  # under the GIL than the work, and a batch ahead of every input, which holds no memory
  # but lets the disk read the next batch while this one is summed (measured, pool not
  # cached: 1.3x faster than two reads ahead; more was slower).
  reads = prefetched(inputs.read, ((leaf, u, b, i) for leaf, u, b in plan.batches
                                   for i in range(len(pool))),
                     inline=inputs.inline, ahead=len(pool))
  out = Output(tmp, plan.leaves, plan.shapes, compress, 2 * plan.block_bytes, syncer)
  try:
    # (padding at the edges may hold anything: errors ignored, NaN is checked on the sums)
    with np.errstate(all="ignore"), blas_single_threaded(), gc_paused():
      sum_batches(plan, pool, [np.float32(a) for a in alphas], inputs, reads, out, bar)
    out.finish()
    write_orbax_files(tmp, plan.src, plan.tree_meta, merged_custom(pool, meta, alphas),
                      plan.shapes)
    syncer.finish()
  except BaseException:
    out.abort()
    syncer.abort()
    raise
  finally:
    reads.close()
    inputs.close()
    bar.close()
  return dict(inputs.reader.stats)


def merge_to_disk(pool: pool_manifest.Pool, meta: checkpoint_meta.CheckpointMeta,
                  alphas: Sequence[float], output: str, memory_budget_mb: float = 256,
                  overwrite: bool = False, progress: bool = True,
                  compress: bool = False, fsync: bool = True) -> dict | None:
  """Linear merge `sum_i alphas[i] * checkpoint_i` written to `output`, out of core.

  `meta` is `checkpoints.validate_pool(pool)`. Peak memory above the runtime stays within
  about 3x `memory_budget_mb` (plus tensorstore's threads and buffers), whatever N and the
  model size; a compressed chunk larger than the budget (a parameter saved unsharded) is
  still decoded whole by tensorstore, once per unit. Uncompressed chunks are summed from
  the input files' mapped pages (OCDBT data files, or Orbax's file-per-chunk layout).
  The output is written in Orbax's default layout (one OCDBT database), uncompressed
  unless `compress` (zstd, as Orbax writes by default), fsynced once (unless not `fsync`:
  for scratch outputs, or a filesystem whose close already makes data durable), then
  renamed into place.
  Raises UserError naming the checkpoint and parameter on NaN/Inf, leaving nothing at
  `output`. With several processes, process 0 writes and the others wait. Returns the
  count of units read raw and through tensorstore (process 0; None on the others).
  """
  check(memory_budget_mb > 0, f"memory budget must be positive, got {memory_budget_mb}",
        "--memory_budget_mb")
  output = os.path.abspath(output)
  outputs.check_output(output, pool.paths, overwrite)
  with outputs.writing(output, overwrite, checkpoints.reads_back(meta.abstract)) as tmp:
    error = stats = None
    if jax.process_index() == 0:
      try:
        os.makedirs(tmp)
        stats = merge_into(tmp, pool, meta, alphas, memory_budget_mb, progress, compress,
                           fsync)
        tokenizer_files.write_files(meta.tokenizer,
                                    os.path.join(tmp, tokenizer_files.TOKENIZER_DIR))
      except BaseException as e:  # (the sibling is removed by `writing`)
        error = e
    if not _all_ok(error is None):
      raise error or UserError("the streaming merge failed on process 0", "--streaming")
  return stats


def _all_ok(ok: bool) -> bool:
  """Process 0's outcome, on every process (so none waits forever on a failed writer)."""
  return multihost.broadcast("streaming_outcome", "ok" if ok else "failed") == "ok"