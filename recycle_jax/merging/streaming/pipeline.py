"""The streaming merge's threaded I/O: reads ahead on reader threads (or views of mapped
pages), bounded writes into the output database, and background writeback and fsync."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import mmap
import os
import threading
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.runtime import waits
from recycle_jax.runtime.errors import UserError
from recycle_jax.merging.streaming.layout import array_spec, chunk_index, chunk_key, create_arrays, database_spec, pieces, raw_chunks
from recycle_jax.merging.streaming.plan import Leaf, crop, region

PREFETCH = 2  # batches read (on as many threads) ahead of the one being added


def prefetched(fn: Callable, items: Iterable, depth: int | None = None,
               inline: Callable = lambda item: False, ahead: int = 0) -> Iterator:
  """fn(item) for each item in order, computed up to `depth` items ahead on as many
  reader threads; or, where `inline(item)`, on this thread when the item is taken, up to
  `ahead` items ahead (cheap work, e.g. views of mapped pages and read-ahead hints: a
  hand-off under the GIL can cost more than the work, and a hint is worth most early)."""
  depth = depth or PREFETCH
  ahead = max(ahead, depth)
  items = iter(items)
  ex = concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="merge-read")
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
      yield waits.result(future, "a read of the streaming merge")
  finally:
    for f, _ in pending:
      f.cancel()
    ex.shutdown(wait=not waits.stuck.is_set())  # a stuck reader is left behind


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
    waits.result(future, "a write of the streaming merge")

  def finish(self) -> None:
    while self.pending:
      self._wait_one()

  def abort(self) -> None:
    """Waits for the writes in flight (they write files) and drops their errors: the
    merge is failing anyway and its error is the one to report."""
    while self.pending and not waits.stuck.is_set():
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
        waits.result(self.running, "the output's writeback", self.top)
      fsync_tree(self.top)
    finally:
      self.ex.shutdown(wait=not waits.stuck.is_set())

  def abort(self) -> None:
    self.ex.shutdown(wait=not waits.stuck.is_set(), cancel_futures=True)


class NoSync:
  """Syncer's interface, syncing nothing (outputs whose durability the caller handles)."""

  def wrote(self, n: int) -> None:
    pass

  def finish(self) -> None:
    pass

  def abort(self) -> None:
    pass


def fsync_tree(top: str) -> None:
  """fsync every file and directory under `top` (each wait bounded)."""
  paths = []
  for root, _, files in os.walk(top):
    paths += [os.path.join(root, f) for f in files] + [root]
  ex = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="merge-fsync")
  try:
    for f in [ex.submit(on_file, path, os.fsync) for path in paths]:
      waits.result(f, "an fsync of the merged checkpoint", top)
  finally:
    ex.shutdown(wait=not waits.stuck.is_set(), cancel_futures=True)


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
    self.stores = waits.call(lambda: create_arrays(out_dir, leaves, chunks, ctx, compress),
                             "creating the merged checkpoint's arrays", out_dir)
    self.kv = None if compress else waits.result(
        ts.KvStore.open(database_spec(out_dir), context=ctx), "opening the output", out_dir)
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


class Reader:
  """Reads a batch of units of one leaf from one checkpoint into a flat buffer, each unit
  unit-shaped (see unit_shape). Stored bytes that are already the array (uncompressed
  zarr in OCDBT, chunked like the plan) are mapped (`Mapped`, no copy) or read with pread
  straight into the buffer; anything else goes through tensorstore (zstd, other
  chunkings, zarr3, no OCDBT)."""

  def __init__(self, pool: pool_manifest.Pool, input_meta: list, ctx: ts.Context):
    self.pool, self.input_meta, self.ctx = pool, input_meta, ctx
    self.indexes = waits.call(
        lambda: [self.unreadable_as_user_error(i, chunk_index, e.path, m, ctx)
                 for i, (e, m) in enumerate(zip(pool.entries, input_meta))],
        "reading the pool's chunk indexes", pool.entries[0].path if pool.entries else "")
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
    return waits.result(ts.open(spec, read=True, context=self.ctx), "opening an array",
                        self.pool.entries[i].path)

  def _fd(self, path: str) -> int:
    with self.lock:
      return self._fd_unlocked(path)

  def _fd_unlocked(self, path: str) -> int:
    if path not in self.fds:  # (mapped reads open on the summing thread: bounded)
      self.fds[path] = waits.call(lambda: os.open(path, os.O_RDONLY), "opening a data file",
                                  path)
    return self.fds[path]

  def _map(self, path: str) -> mmap.mmap:
    with self.lock:
      if path not in self.maps:
        self.maps[path] = mmap.mmap(self._fd_unlocked(path), 0, access=mmap.ACCESS_READ)
      return self.maps[path]

  def unreadable_as_user_error(self, i: int, fn: Callable, *args, leaf: Leaf | None = None):
    """fn(*args); a failure to read checkpoint i (truncated, damaged) as one line naming it."""
    try:
      return fn(*args)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, tensorstore's errors)
      entry = self.pool.entries[i]
      what = f"parameter {leaf.path!r}: " if leaf is not None else ""
      raise UserError(f"checkpoint data is unreadable (corrupted or truncated?): {what}"
                      f"{type(e).__name__}: {' '.join(str(e).split())[:120]}",
                      f"checkpoint {entry.name!r} at {entry.path}",
                      "re-write or remove this checkpoint") from None

  def read(self, i: int, leaf: Leaf, ushape: Sequence[int], batch: Sequence[tuple],
           buf: np.ndarray, mapped: bool = False) -> np.ndarray | list[np.ndarray] | "Mapped":
    return self.unreadable_as_user_error(i, self._read, i, leaf, ushape, batch, buf, mapped,
                                         leaf=leaf)

  def _read(self, i: int, leaf: Leaf, ushape: Sequence[int], batch: Sequence[tuple],
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
      return [waits.result(f, "a read", self.pool.entries[i].path) for f in futures]
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
