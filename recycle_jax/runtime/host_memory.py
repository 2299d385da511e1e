"""The process's host heap: memory the C allocator keeps after it was freed."""
from __future__ import annotations

import ctypes
import ctypes.util


def release_freed() -> None:
  """Returns the heap's freed pages to the system (glibc's malloc_trim; elsewhere a no-op).
  XLA's compiler frees its working memory when a compile ends, but malloc keeps it: the
  program's own buffers are then allocated beside it, not in it (measured on `eval` of
  Gemma 3 270M: 0.6 GB kept after compiling the tasks' program)."""
  name = ctypes.util.find_library("c")
  try:
    trim = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError, TypeError):
    return
  trim(0)
