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
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import gc
import glob
import itertools
import json
import math
import mmap
import os
import queue
import shutil
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import scipy
import tensorstore as ts
from scipy.linalg.blas import saxpy as _saxpy
from tqdm.auto import tqdm

from recycle_jax import checkpoints
from recycle_jax.errors import UserError, check
from recycle_jax.partitioning import path_str

ACC_BYTES = 4  # float32 accumulator
PREFETCH = 2  # batches read (on as many threads) ahead of the one being added
TILE = 1 << 15  # elements per fused multiply-add step: the term stays in L2 cache
# Resident at the peak, in batches: PREFETCH + 2 read buffers (one being added, PREFETCH
# filling, one spare), two accumulators (one summing, one being written) and two batches
# of finished sums in the output's writes in flight (tensorstore's copies; see Output).
BLOCKS_IN_BUDGET = 8
# Uncompressed chunks are summed straight from the files' mapped pages (no copy into a
# buffer); False reads them with pread into the buffers instead.
MAPPED = True


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


# ----------------------------------------------------------------------------- planning

def leaves_of(abstract, write_shapes: dict[str, Sequence[int]]) -> list[Leaf]:
  """Leaves of a metadata tree, with stored chunk shapes (`write_shapes` by Orbax name)."""
  out = []
  for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    keys = tuple(path_str(p).split("/"))
    shape = tuple(x.shape)
    ws = write_shapes.get(".".join(keys))
    ws = tuple(ws) if ws and len(ws) == len(shape) else shape
    out.append(Leaf(keys, shape, np.dtype(x.dtype), tuple(max(1, c) for c in ws)))
  return out


def unit_shape(leaf: Leaf, max_bytes: int) -> tuple[int, ...]:
  """Shape of a unit: the piece of a leaf read from every input, summed and written as one
  output chunk. It is the stored chunk shape with leading dimensions cut down until a
  float32 unit fits `max_bytes` (>= 1 element): dimensions before the cut one are 1, the
  cut one takes what fits (whole chunks when one fits), later ones are whole. So a unit
  is one contiguous run of a stored chunk, or of a few stored chunks along one axis."""
  if not leaf.shape:
    return ()
  chunk = leaf.write_shape
  for d in range(len(chunk)):
    inner = ACC_BYTES * math.prod(chunk[d + 1:])
    if inner <= max_bytes or d == len(chunk) - 1:
      fit = max(1, max_bytes // inner)
      n = fit // chunk[d] * chunk[d] if fit >= chunk[d] else fit
      n = min(n, max(chunk[d], leaf.shape[d]))  # no longer than the leaf, or one chunk
      return (1,) * d + (max(1, n),) + tuple(chunk[d + 1:])
  raise AssertionError("unreachable")


def units(leaf: Leaf, ushape: Sequence[int]) -> list[tuple[int, ...]]:
  """Origins of the units covering the leaf, in C order (`()` for a scalar)."""
  grid = [range(0, n, u) for n, u in zip(leaf.shape, ushape)]
  return [tuple(o) for o in itertools.product(*grid)] if all(leaf.shape) else (
      [] if leaf.shape else [()])


def region(leaf: Leaf, ushape: Sequence[int], origin: Sequence[int]) -> tuple[slice, ...]:
  """The part of the leaf a unit covers (units at the far edge are cut by the shape)."""
  return tuple(slice(o, min(o + u, n)) for o, u, n in zip(origin, ushape, leaf.shape))


def crop(ushape: Sequence[int], reg: Sequence[slice]) -> tuple[slice, ...]:
  """The valid part of a unit-shaped buffer."""
  return tuple(slice(0, r.stop - r.start) for r in reg)


def batches(leaf: Leaf, ushape: Sequence[int], max_bytes: int) -> list[list[tuple]]:
  """Units of a leaf grouped into batches of at most `max_bytes` of float32 (>= 1 unit):
  a batch is read from every input in turn and summed in one accumulator."""
  per = max(1, max_bytes // max(1, ACC_BYTES * math.prod(ushape)))
  us = units(leaf, ushape)
  return [us[i:i + per] for i in range(0, len(us), per)]


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
  kv = ({**database_spec(base), "path": f"{name}/"}
        if tree_meta.get("use_ocdbt", True) else
        {"driver": "file", "path": os.path.join(base, name) + "/"})
  return {"driver": "zarr3" if tree_meta.get("use_zarr3", False) else "zarr", "kvstore": kv}


def database_spec(ckpt_dir: str) -> dict:
  """The kvstore spec of a checkpoint's OCDBT database (keys: `<array>/<chunk>`)."""
  return {"driver": "ocdbt", "base": f"file://{os.path.abspath(ckpt_dir)}/"}


def create_arrays(out_dir: str, leaves: Sequence[Leaf], chunks: dict[str, Sequence[int]],
                  ctx: ts.Context, compress: bool = False) -> dict[str, ts.TensorStore]:
  """Empty output arrays, created in one commit; returned outside any transaction."""
  txn = ts.Transaction()
  out = {leaf.name: ts.open(output_spec(out_dir, leaf, chunks[leaf.name], compress),
                            create=True, dtype=ts.dtype(leaf.dtype.name), shape=leaf.shape,
                            transaction=txn, context=ctx).result() for leaf in leaves}
  txn.commit_sync()
  return {k: v.with_transaction(None) for k, v in out.items()}


def output_spec(out_dir: str, leaf: Leaf, chunks: Sequence[int], compress: bool = False) -> dict:
  """A zarr array in Orbax's layout, every chunk stored; zstd only if `compress` (float
  weights shrink by ~8% and encoding costs more than the rest of the merge together)."""
  spec = array_spec(out_dir, leaf.name)
  spec["metadata"] = {"chunks": [max(1, c) for c in chunks] or [1],
                      "compressor": {"id": "zstd", "level": 1} if compress else None}
  if not leaf.shape:
    spec["metadata"].pop("chunks")
  spec["store_data_equal_to_fill_value"] = True
  return spec


def ocdbt_index(ckpt_dir: str, ctx: ts.Context) -> dict[bytes, tuple] | None:
  """Where each key of a checkpoint's OCDBT database lies: `(file, offset, length)` for a
  value in a data file, `(None, bytes)` for one stored in the tree. From the database's
  own dump (`tensorstore.ocdbt.dump`); None where that is not possible (no OCDBT, a layout
  this does not know), and the caller reads through tensorstore instead."""
  try:
    base = ts.KvStore.open(f"file://{os.path.abspath(ckpt_dir)}/", context=ctx).result()
    manifest = ts.ocdbt.dump(base, context=ctx).result()
    if not manifest.get("versions"):
      return None
    root = manifest["versions"][-1].get("root", {}).get("location")
    index: dict[bytes, tuple] = {}
    if not root:
      return index
    stack = [(root, b"")]
    while stack:
      location, prefix = stack.pop()
      node = ts.ocdbt.dump(base, location, context=ctx).result()
      for e in node["entries"]:
        if "location" in e:  # an interior node: keys below it are relative to it
          stack.append((e["location"], prefix + e.get("subtree_common_prefix", b"")))
        elif "inline_value" in e:
          index[prefix + e["key"]] = (None, e["inline_value"])
        else:
          kind, rest = e["indirect_value"].split(":", 1)
          file_id, offset, length = rest.rsplit(":", 2)
          if kind != "value" or "%" in file_id:
            return None
          index[prefix + e["key"]] = (os.path.join(ckpt_dir, file_id.replace(":", "", 1)),
                                      int(offset), int(length))
    return index
  except Exception:  # noqa: BLE001 - any surprise: tensorstore reads it the slow, sure way
    return None


def files_index(ckpt_dir: str) -> dict[bytes, tuple]:
  """`ocdbt_index` for Orbax's other layout (`use_ocdbt=False`: a directory per array,
  a file per chunk): each file is a key, its bytes the value; `.zarray` files are read."""
  index: dict[bytes, tuple] = {}
  top = os.path.abspath(ckpt_dir)
  for root, _, files in os.walk(top):
    for name in files:
      path = os.path.join(root, name)
      key = os.path.relpath(path, top).replace(os.sep, "/").encode()
      if name == ".zarray":
        with open(path, "rb") as f:
          index[key] = (None, f.read())
      else:
        index[key] = (path, 0, os.path.getsize(path))
  return index


def chunk_index(ckpt_dir: str, tree_meta: dict | None, ctx: ts.Context) -> dict | None:
  """Where each stored key of a checkpoint lies, in either of Orbax's layouts."""
  if (tree_meta or {}).get("use_ocdbt", True):
    return ocdbt_index(ckpt_dir, ctx)
  return files_index(ckpt_dir)


def chunk_key(name: str, index: Sequence[int], sep: str = ".") -> str:
  """A zarr v2 chunk's key in its checkpoint: `<array>/<i>.<j>...` (Orbax's separator)."""
  return f"{name}/{sep.join(map(str, index))}"


def raw_chunks(index: dict[bytes, tuple] | None, leaf: Leaf) -> tuple[dict, str] | None:
  """`(chunk key -> location, dimension separator)` when every stored chunk of the leaf
  can be used as bytes as they are: zarr v2, uncompressed, no filters, C order, the
  leaf's dtype, the plan's chunk shape, no chunk left out. Else None."""
  if index is None or not leaf.shape or not all(leaf.shape):
    return None
  meta = index.get(f"{leaf.name}/.zarray".encode())
  if meta is None or meta[0] is not None:
    return None
  try:
    z = json.loads(meta[1])
  except ValueError:
    return None
  dtype = "bfloat16" if leaf.dtype.name == "bfloat16" else leaf.dtype.str
  if (z.get("zarr_format") != 2 or z.get("compressor") is not None or z.get("filters")
      or z.get("order") != "C" or z.get("dtype") != dtype or dtype[0] == ">"
      or list(z.get("chunks", [])) != list(leaf.write_shape)
      or list(z.get("shape", [])) != list(leaf.shape)):
    return None
  sep = z.get("dimension_separator", ".")
  grid = [range(-(-n // c)) for n, c in zip(leaf.shape, leaf.write_shape)]
  nbytes = math.prod(leaf.write_shape) * leaf.dtype.itemsize
  locs = {}
  for k in itertools.product(*grid):
    loc = index.get(chunk_key(leaf.name, k, sep).encode())
    if loc is None or (len(loc[1]) if loc[0] is None else loc[2]) != nbytes:
      return None  # missing, or not a whole chunk: tensorstore reads (and reports) it
    locs[k] = loc
  return locs, sep


@functools.lru_cache(maxsize=1 << 12)  # the same for every input chunked alike
def pieces(leaf: Leaf, ushape: tuple[int, ...], origin: tuple[int, ...]) -> list[tuple]:
  """Where a unit's stored bytes lie: `(chunk index, byte offset in the chunk, bytes,
  element offset in the unit)`, one per stored chunk the unit crosses (see unit_shape)."""
  chunk, item = leaf.write_shape, leaf.dtype.itemsize
  d = next((i for i, u in enumerate(ushape) if u != 1), len(ushape) - 1)  # the cut axis
  inner = math.prod(chunk[d + 1:])
  stride = [math.prod(chunk[j + 1:]) for j in range(len(chunk))]
  key = [o // c for o, c in zip(origin, chunk)]
  within = sum((o % c) * s for o, c, s in zip(origin[:d], chunk[:d], stride[:d]))
  out = []
  start, stop = origin[d], min(origin[d] + ushape[d], leaf.shape[d])
  while start < stop:
    k, r = divmod(start, chunk[d])
    n = min(chunk[d] - r, stop - start)
    key[d] = k
    out.append((tuple(key), (within + r * stride[d]) * item, n * inner * item,
                (start - origin[d]) * inner))
    start += n
  return out


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

def prefetched(fn: Callable, items: Iterable, depth: int | None = None,
               inline: Callable = lambda item: False, ahead: int = 0) -> Iterator:
  """fn(item) for each item in order, computed up to `depth` items ahead on as many
  reader threads; or, where `inline(item)`, on this thread when the item is taken, up to
  `ahead` items ahead (cheap work, e.g. views of mapped pages and read-ahead hints: a
  hand-off under the GIL can cost more than the work, and a hint is worth most early)."""
  depth = depth or PREFETCH
  ahead = max(ahead, depth)
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="merge-read") as ex:
    pending = collections.deque()  # (future, on a reader thread)
    threaded, item, here = 0, None, False
    try:
      while True:
        if item is None:
          item = next(items, None)
          here = item is not None and inline(item)
        if item is not None and len(pending) < ahead and (here or threaded < depth):
          if here:
            done = concurrent.futures.Future()
            done.set_result(fn(item))
            pending.append((done, False))
          else:
            pending.append((ex.submit(fn, item), True))
            threaded += 1
          item = None
          continue
        if not pending:
          return
        future, on_thread = pending.popleft()
        threaded -= on_thread
        yield future.result()
    finally:
      for f, _ in pending:
        f.cancel()


class Writes:
  """Writes outside any transaction, at most about `limit` bytes in flight: the output's
  OCDBT database commits whatever is pending at once, so commits stay few without holding
  a transaction's worth of data. The context must not fsync each write (`file_io_sync`
  false): `fsync_tree` makes the finished directory durable once, before it is renamed."""

  def __init__(self, limit: int):
    self.limit, self.pending, self.bytes = limit, collections.deque(), 0

  def write(self, store: ts.TensorStore, index, array: np.ndarray) -> ts.Future:
    """Starts a write; the returned future (tensorstore's `copy`) says when `array` may
    be reused."""
    future = store[index].write(array)
    self.track(future, array.nbytes)
    return future.copy

  def track(self, future: ts.Future, nbytes: int) -> None:
    """Counts a write in flight; waits for the oldest while over the limit."""
    self.pending.append((future, nbytes))
    self.bytes += nbytes
    while self.bytes > self.limit and len(self.pending) > 1:
      self._wait_one()

  def _wait_one(self) -> None:
    future, n = self.pending.popleft()
    self.bytes -= n
    future.result()

  def finish(self) -> None:
    while self.pending:
      self._wait_one()

  def abort(self) -> None:
    """Waits for the writes in flight (they write files) and drops their errors: the
    merge is failing anyway and its error is the one to report."""
    while self.pending:
      try:
        self._wait_one()
      except Exception:  # noqa: BLE001
        pass


class Syncer:
  """Starts the output's writeback in the background while the merge goes on, so the
  final fsync finds little left to flush (the disk works while the CPU sums)."""

  def __init__(self, top: str, every: int):
    self.top, self.every, self.bytes, self.running = top, every, 0, None
    self.ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merge-sync")

  def wrote(self, n: int) -> None:
    self.bytes += n
    if self.bytes >= self.every and (self.running is None or self.running.done()):
      self.bytes, self.running = 0, self.ex.submit(start_writeback, self.top)

  def finish(self) -> None:
    """Waits for a pass in flight (its errors are reported), then syncs everything."""
    try:
      if self.running is not None:
        self.running.result()
      fsync_tree(self.top)
    finally:
      self.ex.shutdown(wait=True)

  def abort(self) -> None:
    self.ex.shutdown(wait=True, cancel_futures=True)


class NoSync:
  """Syncer's interface, syncing nothing (outputs whose durability the caller handles)."""

  def wrote(self, n: int) -> None:
    pass

  def finish(self) -> None:
    pass

  def abort(self) -> None:
    pass


def fsync_tree(top: str) -> None:
  """fsync every file and directory under `top`."""
  paths = []
  for root, _, files in os.walk(top):
    paths += [os.path.join(root, f) for f in files] + [root]
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    list(ex.map(lambda path: on_file(path, os.fsync), paths))


def start_writeback(top: str) -> None:
  """Starts writing back the dirty pages of every file under `top`, without waiting: on
  Linux, posix_fadvise(DONTNEED) does that (and drops the pages already clean), where an
  fsync would wait for the disk and commit the journal each time (measured: the merge
  with fsync passes took 1.2x as long). fsync passes where there is no fadvise."""
  if hasattr(os, "posix_fadvise"):
    drop_cached(top)
  else:
    fsync_tree(top)


def drop_cached(top: str) -> None:
  """posix_fadvise(DONTNEED) on every file under `top`: Linux starts writing back their
  dirty pages and drops their clean ones from the page cache."""
  for root, _, files in os.walk(top):
    for name in files:
      on_file(os.path.join(root, name),
              lambda fd: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))


def on_file(path: str, fn: Callable[[int], object]) -> None:
  """fn(fd) on `path` opened read-only (a file or a directory); nothing if it is gone."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:  # tensorstore's lock files come and go
    return
  try:
    fn(fd)
  finally:
    os.close(fd)


class Output:
  """The merged checkpoint's arrays, in one OCDBT database as Orbax writes them, written
  unit by unit (a unit is one output chunk). Uncompressed, a unit's bytes are its chunk's
  stored value, so they go to the database as that key's value: no chunk cache and no
  encoding, which made tensorstore's array writes cost more than the summing (measured).
  zstd output and scalars are written as arrays. At most `limit` bytes in flight."""

  def __init__(self, out_dir: str, leaves: Sequence[Leaf], chunks: dict[str, Sequence[int]],
               compress: bool, limit: int, syncer: "Syncer | NoSync"):
    ctx = ts.Context({"file_io_sync": False})  # see Writes
    self.stores = create_arrays(out_dir, leaves, chunks, ctx, compress)
    self.kv = None if compress else ts.KvStore.open(database_spec(out_dir), context=ctx).result()
    self.writes, self.syncer = Writes(limit), syncer

  def write(self, leaf: Leaf, ushape: Sequence[int], origin: Sequence[int],
            unit: np.ndarray) -> ts.Future | None:
    """Writes one unit from its flat float32 sum (unit-shaped: edge units carry padding);
    returns a future after which `unit` may be reused, or None if it may be already."""
    r = region(leaf, ushape, origin)
    data = unit.reshape(ushape).astype(leaf.dtype, copy=False)
    self.syncer.wrote(data.nbytes)
    if self.kv is None or not leaf.shape:
      return self.writes.write(self.stores[leaf.name], r, data[crop(ushape, r)])
    if any(x.stop - x.start != u for x, u in zip(r, ushape)):  # an edge chunk: its padding
      data = np.zeros(ushape, leaf.dtype)                      # stored as zeros, as
      data[crop(ushape, r)] = unit.reshape(ushape)[crop(ushape, r)]  # tensorstore does
    key = chunk_key(leaf.name, [o // u for o, u in zip(origin, ushape)])  # units = chunks
    value = data.tobytes()  # a copy: the accumulator is free again at once
    self.writes.track(self.kv.write(key, value), len(value))
    return None

  def finish(self) -> None:
    self.writes.finish()

  def abort(self) -> None:
    self.writes.abort()


def accumulate(acc: np.ndarray | None, alpha: np.float32, x: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
  """acc + alpha * x in float32, as `merging.linear` computes it, in place in `acc` (or
  alpha * x into `out` when acc is None). float32 terms go through BLAS saxpy: one pass
  over memory at its bandwidth (3-4x numpy's multiply-then-add, measured); other dtypes
  are cast tile by tile, TILE elements at a time so the cast term stays in cache."""
  if acc is not None and (acc.shape != x.shape or not acc.flags.c_contiguous):
    acc += alpha * x.astype(np.float32)  # a unit cut at the leaf's edge
    return acc
  if acc is None and out is not None and (out.shape != x.shape or not out.flags.c_contiguous):
    np.multiply(x, alpha, out=out, dtype=np.float32, casting="unsafe")
    return out
  x = x.reshape(-1)
  if acc is None:
    acc = out.reshape(-1) if out is not None else np.empty(x.size, np.float32)
    np.multiply(x, alpha, out=acc, dtype=np.float32, casting="unsafe")
    return acc
  flat = acc.reshape(-1)
  if x.dtype == np.float32 and x.flags.c_contiguous and x.size:
    _saxpy(x, flat, a=float(alpha))  # in place: flat is float32 and contiguous
    return acc
  term = np.empty(min(TILE, x.size), np.float32)
  for s in range(0, x.size, TILE):
    t = term[:min(TILE, x.size - s)]
    np.multiply(x[s:s + t.size], alpha, out=t, dtype=np.float32, casting="unsafe")
    np.add(flat[s:s + t.size], t, out=flat[s:s + t.size])
  return acc


@contextlib.contextmanager
def gc_paused():
  """No cyclic garbage collection while this runs. The merge loop makes many small
  short-lived objects (freed by reference counting, no cycles), whose allocations keep
  triggering collections that walk the whole heap (jax and its imports: ~10^5 objects);
  measured: 5% of the merge's time."""
  was = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was:
      gc.enable()


@contextlib.contextmanager
def blas_single_threaded():
  """scipy's OpenBLAS on one thread while this runs. Otherwise it splits each saxpy over
  a thread per core, which gains nothing on a memory-bound sum, and its worker then
  spin-waits for the next call: measured, it took 46% of the merge's CPU samples, the
  core the file writes and the kernel needed. A no-op where the library is not found."""
  try:
    path = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs",
                                  "libscipy_openblas*"))[0]
    lib = ctypes.CDLL(path)  # already loaded by scipy.linalg.blas: the same handle
    before = lib.scipy_openblas_get_num_threads()
  except (IndexError, OSError, AttributeError):
    yield
    return
  lib.scipy_openblas_set_num_threads(1)
  try:
    yield
  finally:
    lib.scipy_openblas_set_num_threads(before)


class Reader:
  """Reads a batch of units of one leaf from one checkpoint into a flat buffer, each unit
  unit-shaped (see unit_shape). Stored bytes that are already the array (uncompressed
  zarr in OCDBT, chunked like the plan) are mapped (`Mapped`, no copy) or read with pread
  straight into the buffer; anything else goes through tensorstore (zstd, other
  chunkings, zarr3, no OCDBT)."""

  def __init__(self, pool: checkpoints.Pool, input_meta: list, ctx: ts.Context):
    self.pool, self.input_meta, self.ctx = pool, input_meta, ctx
    self.indexes = [chunk_index(e.path, m, ctx) for e, m in zip(pool.entries, input_meta)]
    self.fds: dict[str, int] = {}
    self.maps: dict[str, mmap.mmap] = {}
    self.lock = threading.Lock()
    self.raw = functools.lru_cache(maxsize=4 * len(pool))(self._raw)
    self.store = functools.lru_cache(maxsize=2 * len(pool))(self._store)
    self.stats = collections.Counter()

  def _raw(self, i: int, leaf: Leaf):
    return raw_chunks(self.indexes[i], leaf)

  def _store(self, i: int, name: str) -> ts.TensorStore:
    spec = array_spec(self.pool.entries[i].path, name, self.input_meta[i])
    return ts.open(spec, read=True, context=self.ctx).result()

  def _fd(self, path: str) -> int:
    with self.lock:
      return self._fd_unlocked(path)

  def _fd_unlocked(self, path: str) -> int:
    if path not in self.fds:
      self.fds[path] = os.open(path, os.O_RDONLY)
    return self.fds[path]

  def _map(self, path: str) -> mmap.mmap:
    with self.lock:
      if path not in self.maps:
        self.maps[path] = mmap.mmap(self._fd_unlocked(path), 0, access=mmap.ACCESS_READ)
      return self.maps[path]

  def read(self, i: int, leaf: Leaf, ushape: Sequence[int], batch: Sequence[tuple],
           buf: np.ndarray, mapped: bool = False) -> np.ndarray | list[np.ndarray] | "Mapped":
    """Fills `buf` (flat, the leaf's dtype, len(batch) units) and returns it; or returns
    the batch's units as tensorstore decoded them (a list, each cut to its region); or,
    with `mapped` and stored bytes usable as they are, `Mapped` views of the files' pages
    (no copy: the sum reads the page cache directly)."""
    size = max(1, math.prod(ushape))
    raw = self.raw(i, leaf)
    if raw is None:  # tensorstore: all the batch's reads in flight at once; the decoded
      store = self.store(i, leaf.name)  # arrays are added as they are (no copy into buf)
      futures = [store[region(leaf, ushape, o)].read() for o in batch]
      self.stats["tensorstore"] += len(batch)
      return [f.result() for f in futures]
    locs, _ = raw
    item = leaf.dtype.itemsize
    parts, raw_bytes = [], buf.view(np.uint8)
    for u, origin in enumerate(batch):
      for key, offset, n, at in pieces(leaf, ushape, origin):
        path, where = locs[key][:2]  # (None, the bytes) in the tree, or (file, offset)
        at = u * size + at
        if mapped:
          parts.append(self._view(path, where, offset, n, leaf.dtype, at))
        elif path is None:
          raw_bytes[at * item:at * item + n] = np.frombuffer(where, np.uint8, n, offset)
        elif os.preadv(self._fd(path), [raw_bytes[at * item:at * item + n]],
                       where + offset) != n:
          raise OSError(f"short read of {path} ({leaf.path})")
    self.stats["raw"] += len(batch)
    return Mapped(parts) if mapped else buf

  def _view(self, path: str | None, where, offset: int, n: int, dtype, at: int) -> tuple:
    """One piece of a `Mapped` read: n bytes at `offset` of a chunk stored in the tree
    (`where` is its bytes) or in a data file (`where` is the chunk's offset there)."""
    if path is None:
      return at, np.frombuffer(where, dtype, n // dtype.itemsize, offset), None, 0, 0
    mm, start = self._map(path), where + offset
    page = start - start % mmap.PAGESIZE
    mm.madvise(mmap.MADV_WILLNEED, page, start + n - page)  # read ahead if not cached
    return at, np.frombuffer(mm, dtype, n // dtype.itemsize, start), mm, page, start + n - page

  def close(self) -> None:
    for mm in self.maps.values():
      try:
        mm.close()
      except BufferError:  # a view still alive (an error path): the GC unmaps it later
        pass
    for fd in self.fds.values():
      os.close(fd)
    self.fds.clear()
    self.maps.clear()


@dataclasses.dataclass
class Mapped:
  """A batch read as views of the input files' mapped pages: parts are (element offset in
  the flat unit-shaped batch, view, mapping, page-aligned start, length)."""
  parts: list

  @property
  def nbytes(self) -> int:
    return sum(p[1].nbytes for p in self.parts)

  def release(self) -> None:
    """Drops the views and the pages from this process's resident set (they stay in the
    page cache), so resident memory stays bounded by the budget, not the pool."""
    for _, _, mm, start, length in self.parts:
      if mm is not None:
        mm.madvise(mmap.MADV_DONTNEED, start, length)
    self.parts = []


def as_flat(x, leaf: Leaf, ushape, batch, buf: np.ndarray) -> np.ndarray:
  """A read as one flat unit-shaped buffer (tensorstore's arrays copied into `buf`)."""
  if isinstance(x, np.ndarray):
    return x
  size = max(1, math.prod(ushape))
  for u, (o, part) in enumerate(zip(batch, x)):
    buf[u * size:(u + 1) * size].reshape(ushape)[crop(ushape, region(leaf, ushape, o))] = part
  return buf


def finite(acc: np.ndarray, ushape: Sequence[int], leaf: Leaf, batch: Sequence[tuple]) -> bool:
  """No NaN/Inf in the valid part of a batch (units at the edge carry padding)."""
  size = max(1, math.prod(ushape))
  regions = [region(leaf, ushape, o) for o in batch]
  if all(r.stop - r.start == u for r, u in zip(itertools.chain(*regions), ushape * len(batch))):
    return bool(np.isfinite(acc).all())
  return all(np.isfinite(acc[u * size:(u + 1) * size].reshape(ushape)[crop(ushape, r)]).all()
             for u, r in enumerate(regions))


def nonfinite_error(pool: checkpoints.Pool, leaf: Leaf, ushape, batch, read: Callable) -> UserError:
  """Names the checkpoint with NaN/Inf in this batch (re-reads it: the error path only)."""
  for i, e in enumerate(pool.entries):
    x = read(i, leaf, ushape, batch).astype(np.float32)
    if not finite(x, ushape, leaf, batch):
      return UserError(f"parameter {leaf.path!r} has NaN or Inf values",
                       f"checkpoint {e.name!r} at {e.path}",
                       "repair or drop that checkpoint; nothing was written")
  return UserError(f"the merge of parameter {leaf.path!r} overflows float32", "--weights",
                   "check the checkpoints' magnitudes; nothing was written")


def merged_custom(pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
                  alphas: Sequence[float]) -> dict:
  """The custom metadata the in-memory merge writes, built without loading parameters."""
  out = {"model": meta.model_config,
         "merge": {"method": "linear", "weights": [float(a) for a in alphas],
                   "pool": pool.names}}
  if meta.vocabulary is not None:  # the pool's tokenizer travels (files: merge_to_disk)
    from recycle_jax import vocabularies
    out["vocabulary"] = vocabularies.describe(meta.vocabulary)
  hf = meta.custom.get(checkpoints.META_KEY, {}).get("hf_config")
  if hf:
    out["hf_config"] = hf
  return out


def merge_into(tmp: str, pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
               alphas: Sequence[float], memory_budget_mb: float, progress: bool,
               compress: bool = False, fsync: bool = True) -> dict:
  """Writes the merged checkpoint into the fresh directory `tmp`; returns counts of units
  read raw and through tensorstore."""
  src = pool.entries[0].path
  tree_meta = read_json(src, "_METADATA")
  check(tree_meta is not None and "tree_metadata" in tree_meta,
        "checkpoint has no Orbax _METADATA file", f"checkpoint {pool.entries[0].name!r} at {src}",
        "streaming needs checkpoints written by Orbax >= 0.5; merge without --streaming")
  input_meta = [read_json(e.path, "_METADATA") for e in pool.entries]
  block_bytes = max(1, int(memory_budget_mb * 2**20) // BLOCKS_IN_BUDGET)
  leaves = leaves_of(meta.abstract, write_shapes(tree_meta))
  shapes = {leaf.name: unit_shape(leaf, block_bytes) for leaf in leaves}
  plan = [(leaf, shapes[leaf.name], b) for leaf in leaves
          for b in batches(leaf, shapes[leaf.name], block_bytes)]
  reader = Reader(pool, input_meta, ts.Context())
  elems = max([len(b) * max(1, math.prod(u)) for _, u, b in plan], default=1)
  buf_bytes = elems * max([leaf.dtype.itemsize for leaf in leaves] + [ACC_BYTES])
  free = queue.SimpleQueue()
  for _ in range(PREFETCH + 2):  # see BLOCKS_IN_BUDGET
    free.put(np.empty(buf_bytes, np.uint8))

  accs = collections.deque()  # (buffer, futures of the writes still copying from it)
  for _ in range(2):
    accs.append((np.empty(elems, np.float32), []))

  def read(item) -> np.ndarray:
    leaf, ushape, batch, i = item
    n = len(batch) * max(1, math.prod(ushape))
    buf = free.get()
    x = reader.read(i, leaf, ushape, batch, buf.view(leaf.dtype)[:n], mapped=MAPPED)
    if not isinstance(x, np.ndarray):  # tensorstore's arrays or mapped pages: no buffer
      free.put(buf)
    return x

  def fresh_read(i, leaf, ushape, batch) -> np.ndarray:  # the error path's own buffer
    n = len(batch) * max(1, math.prod(ushape))
    return as_flat(reader.read(i, leaf, ushape, batch, np.empty(n, leaf.dtype)), leaf,
                   ushape, batch, np.zeros(n, leaf.dtype))

  def add(acc, w, x, out):
    """accumulate() over a read: a flat buffer, mapped pieces, or tensorstore's arrays
    unit by unit."""
    if isinstance(x, np.ndarray):
      return accumulate(acc, w, x, out)
    first, acc = acc is None, out if acc is None else acc
    if isinstance(x, Mapped):
      for at, part, *_ in x.parts:
        view = acc[at:at + part.size]
        accumulate(None if first else view, w, part, view)
      x.release()
      return acc
    for u, (o, part) in enumerate(zip(batch, x)):
      view = acc[u * size:(u + 1) * size].reshape(ushape)[crop(ushape, region(leaf, ushape, o))]
      accumulate(None if first else view, w, part, view)
    return acc

  weights = [np.float32(a) for a in alphas]
  syncer = Syncer(tmp, 4 * block_bytes) if fsync else NoSync()
  total = sum(leaf.nbytes for leaf in leaves) * len(pool)
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress)
  # Mapped reads are views and a read-ahead hint: made on this thread, as handing them to
  # a reader thread costs more under the GIL than the work, and a batch ahead of every
  # input, which holds no memory but lets the disk read the next batch while this one is
  # summed (measured, pool not cached: 1.3x faster than two reads ahead; more was slower).
  reads = prefetched(read, ((leaf, u, b, i) for leaf, u, b in plan for i in range(len(pool))),
                     inline=lambda item: MAPPED and reader.raw(item[3], item[0]) is not None,
                     ahead=len(pool))
  out = Output(tmp, leaves, shapes, compress, 2 * block_bytes, syncer)
  try:
    # (padding at the edges may hold anything: errors ignored, NaN is checked on the sums)
    with np.errstate(all="ignore"), blas_single_threaded(), gc_paused():
      for leaf, ushape, batch in plan:
        acc = None
        size = max(1, math.prod(ushape))
        spare, copying = accs.popleft()
        for f in copying:  # a write still copying from this buffer
          f.result()
        copying = []
        accs.append((spare, copying))
        for w in weights:
          x = next(reads)
          nbytes = sum(p.nbytes for p in x) if isinstance(x, list) else x.nbytes
          acc = add(acc, w, x, spare[:len(batch) * size])  # (releases a Mapped read)
          if isinstance(x, np.ndarray):
            free.put(x.base if x.base is not None else x)
          bar.update(nbytes)
          del x
        if not finite(acc, ushape, leaf, batch):  # one check per batch, on the sum: any
          raise nonfinite_error(pool, leaf, ushape, batch, fresh_read)  # NaN/Inf reaches it
        for u, origin in enumerate(batch):
          f = out.write(leaf, ushape, origin, acc[u * size:(u + 1) * size])
          if f is not None:
            copying.append(f)
    out.finish()
    write_orbax_files(tmp, src, tree_meta, merged_custom(pool, meta, alphas), shapes)
    syncer.finish()
  except BaseException:
    out.abort()
    syncer.abort()
    raise
  finally:
    reads.close()
    reader.close()
    bar.close()
  return dict(reader.stats)


def write_orbax_files(out_dir: str, src: str, tree_meta: dict, custom: dict,
                      chunks: dict[str, Sequence[int]]) -> None:
  files = orbax_json(tree_meta, read_json(src, "_CHECKPOINT_METADATA"), custom, chunks)
  for name, data in files.items():
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(data, f)
  if os.path.isfile(os.path.join(src, "_sharding")):  # default placement when restored
    shutil.copy(os.path.join(src, "_sharding"), os.path.join(out_dir, "_sharding"))


def merge_to_disk(pool: checkpoints.Pool, meta: checkpoints.CheckpointMeta,
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
  checkpoints.check_output(output, pool.paths, overwrite)
  tmp = checkpoints.temp_sibling(output)
  error = stats = None
  if jax.process_index() == 0:
    try:
      os.makedirs(tmp)
      stats = merge_into(tmp, pool, meta, alphas, memory_budget_mb, progress, compress, fsync)
      if meta.vocabulary is not None:
        from recycle_jax import vocabularies
        vocabularies.write_files(meta.vocabulary,
                                 os.path.join(tmp, vocabularies.TOKENIZER_DIR))
    except BaseException as e:
      shutil.rmtree(tmp, ignore_errors=True)
      error = e
  if not _all_ok(error is None):
    raise error or UserError("the streaming merge failed on process 0", "--streaming")
  checkpoints.commit(tmp, output, overwrite)
  return stats


def _all_ok(ok: bool) -> bool:
  """Process 0's outcome, on every process (so none waits forever on a failed writer)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
