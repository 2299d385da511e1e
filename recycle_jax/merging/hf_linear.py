"""The linear merge of Hugging Face folders in numpy, by byte ranges (`hf_merge` runs it
for merge_method: linear; no XLA program).

Each tensor is cut into units of UNIT elements. A unit is read from every input with one
positioned read of its byte range into a buffer its thread reuses, accumulated in place
into a float32 buffer (bfloat16 and float16 cast by ml_dtypes / numpy straight into a
reused buffer: no per-input temporary, no fresh pages per unit), divided, cast to the
output dtype and written at its offset. `hf_merge.run_threaded` runs the units on one
thread per core: positioned reads and writes, numpy's ufuncs and ml_dtypes' casts release
the GIL.

The arithmetic is the jitted kernel's (`hf_kernel.merge_tensor`, method 'linear'):
float32 weight x input summed in input order, divided by the float32 sum of the weights
when normalized, rounded to the output dtype to nearest even; the outputs are equal bit
for bit (tests/merging/test_hf_linear.py).
"""
from __future__ import annotations

import threading

import numpy as np

from recycle_jax.checkpoint_io import safetensors_io

UNIT = 1 << 18  # elements per unit: its float32 accumulator (1 MiB) and terms stay in L2

_local = threading.local()


def units(size: int) -> list[tuple[int, int]]:
  """[start, stop) element ranges of UNIT elements covering a tensor of `size` elements
  (one if empty)."""
  unit = UNIT
  return [(s, min(s + unit, size)) for s in range(0, size, unit)] or [(0, 0)]


def weights(inputs, resolved) -> tuple[np.ndarray, np.float32 | None]:
  """[N] float32 weights of a tensor (0 where an input has none, like the base), and the
  divisor when normalized: their float32 sum, in input order."""
  shared, per = resolved
  w = np.array([per[m].get("weight") or 0.0 for m in inputs], np.float32)
  if not shared.get("normalize"):
    return w, None
  total = np.float32(0)
  for x in w:
    total = np.float32(total + x)
  return w, total


def _buffer(slot: str, n: int, dtype) -> np.ndarray:
  """n elements of `dtype` in this thread's reused buffer `slot` (grown when needed)."""
  nbytes = n * np.dtype(dtype).itemsize
  buf = getattr(_local, slot, None)
  if buf is None or buf.nbytes < nbytes:
    buf = np.empty(max(nbytes, 64), np.uint8)
    setattr(_local, slot, buf)
  return buf[:nbytes].view(dtype)


def merge_range(reader: safetensors_io.Reader, infos: list[safetensors_io.TensorInfo],
                w: np.ndarray, divisor: np.float32 | None, start: int, stop: int,
                out_dtype) -> np.ndarray:
  """Elements [start, stop) of the flattened merge sum_i w[i] * input_i (/ divisor), as
  a 1-D array of out_dtype in this thread's buffer (valid until its next call)."""
  n = stop - start
  acc = _buffer("acc", n, np.float32)
  for i, (info, wi) in enumerate(zip(infos, w)):
    x = reader.read_into(info, _buffer("raw", n, info.dtype), start)
    term = acc if i == 0 else x if x.dtype == np.float32 else _buffer("term", n, np.float32)
    if term is not x:
      np.copyto(term, x, casting="unsafe")  # exact from 16 bits; rounded from float64
    if wi != 1:  # 1 * x is x
      np.multiply(term, wi, out=term)
    if i:
      np.add(acc, term, out=acc)
  if divisor is not None:
    np.divide(acc, divisor, out=acc)
  if np.dtype(out_dtype) == np.float32:
    return acc
  out = _buffer("out", n, out_dtype)
  np.copyto(out, acc, casting="unsafe")  # round to nearest even, as XLA's convert
  return out
