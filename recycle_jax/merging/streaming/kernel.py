"""The streaming merge's sum and the process settings it runs under: BLAS saxpy into a
float32 accumulator, no cyclic GC, OpenBLAS on one thread."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import os

import numpy as np
import scipy
from scipy.linalg.blas import saxpy as _saxpy

TILE = 1 << 15  # elements per fused multiply-add step: the term stays in L2 cache


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
