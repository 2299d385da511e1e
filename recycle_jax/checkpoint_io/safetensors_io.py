"""Hugging Face safetensors folders, tensor by tensor: headers read alone, tensors read with
one positioned read each (no memory map: a read tensor's pages do not stay in the
process's resident set), output written shard by shard at offsets fixed up front, with
`model.safetensors.index.json` when there is more than one shard.

A folder is config.json plus `model.safetensors` or the shards its index names; pickled
weights (.bin, .pt) are refused, never opened.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from recycle_jax.runtime import validation, waits
from recycle_jax.runtime.errors import UserError, check

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
FLOATING = frozenset(np.dtype(DTYPES[k]) for k in ("F64", "F32", "F16", "BF16"))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute offsets in the file
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
  """A safetensors file's tensors (name -> TensorInfo), from the one header reader every
  path shares (`validation.read_safetensors_header`: offsets against the file size,
  overlapping byte ranges, weights of a non-floating type, bounded JSON)."""
  header, start = validation.read_safetensors_header(path)
  out = {}
  for name, v in header.items():
    if name == "__metadata__":
      continue
    check(v["dtype"] in DTYPES, f"tensor {name!r} is of type {v['dtype']}, which is not "
          "read", path, f"store it as one of {', '.join(DTYPES)}")
    a, b = v["data_offsets"]
    out[name] = TensorInfo(path, np.dtype(DTYPES[v["dtype"]]), tuple(v["shape"]),
                           start + a, start + b)
  return out


def folder_tensors(folder: str) -> dict[str, TensorInfo]:
  """Every tensor of a Hugging Face folder, from the headers alone."""
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    doc = validation.load_json(index, INDEX, "the index is damaged: re-save the model")
    try:
      files = sorted(set(doc["weight_map"].values()))
    except (KeyError, TypeError, AttributeError) as e:
      raise UserError(f"cannot read {INDEX}: {type(e).__name__}", folder,
                      "the index is damaged") from None
  else:
    files = [WEIGHTS]
  pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
  for f in files:
    check(os.path.isfile(os.path.join(folder, f)), f"weights file {f} not found", folder,
          "save the model with safe_serialization (pickled .bin/.pt are never loaded)"
          if pickled else "the folder is incomplete")
  out: dict[str, TensorInfo] = {}
  for f in files:
    for name, info in read_header(os.path.join(folder, f)).items():
      check(name not in out, f"tensor {name!r} is in two shards", folder)
      out[name] = info
  return out


class Reader:
  """Positioned reads of tensors, each file opened once."""

  def __init__(self):
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()  # reads may come from several threads

  def read(self, info: TensorInfo) -> np.ndarray:
    out = np.empty(info.shape, info.dtype)
    self.read_into(info, out.reshape(-1), 0)
    return out

  def read_into(self, info: TensorInfo, out: np.ndarray, start: int = 0) -> np.ndarray:
    """Elements [start, start + out.size) of the flattened tensor into `out` (1-D, of the
    tensor's dtype, e.g. a reused buffer): one positioned read of that byte range."""
    with self._lock:
      fd = self._fds.get(info.file)
      if fd is None:
        fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
    offset, n = info.start + start * info.dtype.itemsize, out.nbytes
    assert out.dtype == info.dtype and offset + n <= info.end, (info, start, out.size)
    view, pos = memoryview(out.view(np.uint8)), 0
    while pos < n:  # pread may return less than asked
      got = os.preadv(fd, [view[pos:]], offset + pos)
      check(got > 0, "unexpected end of file", info.file, "the file is truncated")
      pos += got
    return out

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()


def shard_plan(specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int
               ) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
  """Tensors in order, cut into shards of at most max_shard_bytes (one tensor may exceed)."""
  shards, size = [[]], 0
  for name, dtype, shape in specs:
    n = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, np.dtype(dtype), tuple(shape)))
    size += n
  return shards


class Writer:
  """Writes a folder's safetensors shards; every header is written first, each tensor at
  its offset as it comes (`write` in any order), the index last."""

  def __init__(self, folder: str, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
               max_shard_bytes: int = 5 << 30):
    shards = shard_plan(list(specs), max_shard_bytes)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    self.folder, self._where, self._fds = folder, {}, []
    self.weight_map, self.total = {}, 0
    for fname, shard in zip(names, shards):
      header, pos = {"__metadata__": {"format": "pt"}}, 0  # transformers needs "format"
      for name, dtype, shape in shard:
        n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        pos += n
      raw = json.dumps(header, separators=(",", ":")).encode()
      raw += b" " * (-len(raw) % 8)  # data 8-byte aligned
      fd = os.open(os.path.join(folder, fname), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      self._fds.append(fd)
      os.write(fd, struct.pack("<Q", len(raw)) + raw)
      os.ftruncate(fd, 8 + len(raw) + pos)
      for name, dtype, shape in shard:
        a, b = header[name]["data_offsets"]
        self._where[name] = (fd, 8 + len(raw) + a, b - a, dtype, shape)
        self.weight_map[name] = fname
      self.total += pos
    self._index = len(shards) > 1

  def write(self, name: str, x: np.ndarray) -> None:
    fd, offset, n, dtype, shape = self._where[name]
    x = np.ascontiguousarray(x)
    assert x.dtype == dtype and x.shape == shape, (name, x.dtype, x.shape, dtype, shape)
    self._pwrite(fd, x, offset)

  def write_range(self, name: str, start: int, x: np.ndarray) -> None:
    """Elements [start, start + x.size) of the flattened tensor `name` (x 1-D, its dtype)."""
    fd, offset, n, dtype, _ = self._where[name]
    assert x.dtype == dtype and x.ndim == 1 and (start + x.size) * dtype.itemsize <= n, (
        name, x.dtype, start, x.size)
    self._pwrite(fd, np.ascontiguousarray(x), offset + start * dtype.itemsize)

  @staticmethod
  def _pwrite(fd: int, x: np.ndarray, offset: int) -> None:
    view, pos = memoryview(x.reshape(-1).view(np.uint8)), 0
    while pos < x.nbytes:
      pos += os.pwritev(fd, [view[pos:]], offset + pos)

  def close(self, fsync: bool = True) -> None:
    if fsync:
      waits.call(lambda: [os.fsync(fd) for fd in self._fds], "an fsync of the merged folder",
                 self.folder)
    for fd in self._fds:
      os.close(fd)
    self._fds = []
    if self._index:
      with open(os.path.join(self.folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
                  f, indent=2)


def reads_back(names: Iterable[str]) -> Callable[[str], None]:
  """A check that a written folder is complete: config.json and the headers of its
  safetensors files read back, holding exactly the tensors `names` (a success is reported
  only after it)."""
  want = sorted(names)

  def verify(folder: str) -> None:
    check(os.path.isfile(os.path.join(folder, "config.json")), "the written folder has no "
          "config.json", folder, "rerun the command (was the disk full?)")
    got = sorted(folder_tensors(folder))
    check(got == want, f"the written folder does not read back whole ({len(got)} of "
          f"{len(want)} tensors)", folder, "rerun the command (was the disk full, or did "
          "something else write there?)")
  return verify
