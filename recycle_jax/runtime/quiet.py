"""stderr carries recycle_jax's own lines only, at the chosen --log_level.

Native libraries (TensorFlow through seqio, XLA, CUDA stubs, abseil) write start-up lines
straight to file descriptor 2 (oneDNN notices, "Could not find cuda drivers", absl's
"All log messages before absl::InitializeLog()"), some before any environment variable
can silence them. `set_env` silences what environment variables can, before those
libraries are imported; `NativeFilter` points fd 2 at a pipe whose reader forwards every
line but native libraries' INFO/WARNING lines (glog format from a C/C++ source file) and
that pre-init notice. Python's own lines (absl logging, the `error:` line) pass
untouched, as does everything at --log_level=debug.

`abandoned_reads` covers a restore that fails: Orbax reads the arrays concurrently in
its own asyncio loop and gives up at the first failed read; the other reads' futures,
failed too, are logged by asyncio as "exception was never retrieved" (with a TensorStore
traceback) whenever they are garbage-collected, after the `error:` line or before it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import threading
import traceback
from typing import Iterator

ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "2"}
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+\.(cc|c|h|cpp|cu):\d+\] .*|"
    rb"E\d{4} .*(Unable to register (cuDNN|cuFFT|cuBLAS)|cuda|CUDA).*)\r?$")


def set_env() -> None:
  """Environment variables read by native libraries when they load (user's values win)."""
  for k, v in ENV.items():
    os.environ.setdefault(k, v)


class NativeFilter:
  """fd 2 through a filtering pipe, from start() to stop()."""

  def __init__(self, keep_all: bool = False):
    self.keep_all = keep_all
    self.real = self.thread = None

  def start(self) -> "NativeFilter":
    sys.stderr.flush()
    self.real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    self.thread = threading.Thread(target=self._pump, args=(r,), daemon=True,
                                   name="stderr-filter")
    self.thread.start()
    return self

  def _pump(self, r: int) -> None:
    with os.fdopen(r, "rb", buffering=0) as src:
      buf = b""
      while True:
        chunk = src.read(65536)
        if not chunk:
          break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
          self._forward(line + b"\n")
      if buf:
        self._forward(buf)

  def _forward(self, line: bytes) -> None:
    if self.keep_all or not NOISE.match(line.rstrip(b"\n")):
      try:
        os.write(self.real, line)
      except OSError:
        pass

  def stop(self, timeout: float = 2.0) -> None:
    """Restores fd 2; waits (bounded) for the lines still in the pipe."""
    if self.real is None:
      return
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(self.real, 2)  # closes the pipe's last writer (children may hold copies)
    self.thread.join(timeout)
    os.close(self.real)
    self.real = None


class _AbandonedReads(logging.Filter):
  """asyncio's "exception was never retrieved" for an abandoned checkpoint read: a debug
  line (the restore's own failure is the `error:` line); anything else passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    exc = record.exc_info[1]
    text = str(exc) + "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
    if "TensorStore" not in text and "orbax" not in text and "tensorstore" not in text:
      return True
    from absl import logging as absl_logging
    absl_logging.debug("abandoned checkpoint read: %s: %s", type(exc).__name__,
                       str(exc).splitlines()[0][:200] if str(exc) else "")
    return False


ABANDONED_READS = _AbandonedReads()


class _FailedWrites(logging.Filter):
  """Orbax's logs of an exception in a save's threads (with tracebacks: a full disk gives
  30 lines): a debug line instead; the save re-raises it, and its `error:` line says it."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if f"{os.sep}orbax{os.sep}" not in record.pathname or not (
        record.exc_info or "raised an exception" in msg or "Failed to run" in msg):
      return True
    from absl import logging as absl_logging
    absl_logging.debug("failed checkpoint write: %s", record.getMessage()[:300])
    return False


FAILED_WRITES = _FailedWrites()


class _StepItems(logging.Filter):
  """Orbax's warning that an item of a CheckpointManager step has no
  _CHECKPOINT_METADATA of its own (the step keeps it, beside its items: training_run
  reads it there): a debug line; anything else passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    prefix = "Metadata file does not exist: "
    if f"{os.sep}orbax{os.sep}" not in record.pathname or not msg.startswith(prefix):
      return True
    item = os.path.dirname(msg[len(prefix):].strip())
    if not os.path.isfile(os.path.join(os.path.dirname(item), "_CHECKPOINT_METADATA")):
      return True
    from absl import logging as absl_logging
    absl_logging.debug("%s (a step's item; the step holds it)", msg[:300])
    return False


STEP_ITEMS = _StepItems()


def step_items() -> None:
  """Before reading a training run's steps: Orbax's per-item 'no metadata' warnings off."""
  logging.getLogger("absl").addFilter(STEP_ITEMS)  # once: a set of filters


def failed_writes() -> None:
  """Before an Orbax save: a failure inside it reaches stderr once, as the `error:` line."""
  logging.getLogger("absl").addFilter(FAILED_WRITES)  # once: a set of filters


@contextlib.contextmanager
def abandoned_reads() -> Iterator[None]:
  """Around an Orbax read: if it fails, the reads it abandoned never reach stderr (the
  filter stays: their futures may be collected at any time, at exit too)."""
  try:
    yield
  except BaseException:
    logging.getLogger("asyncio").addFilter(ABANDONED_READS)  # once: a set of filters
    gc.collect()  # most of them now, while the failure is being reported
    raise
