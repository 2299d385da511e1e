"""Ctrl-C and SIGTERM end a command as an exception, so every `finally` runs: temp
outputs are removed, the workdir lock is released, the search state (saved after every
generation) is flushed; the CLI then prints one line instead of a traceback."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
  """The process was asked to stop (SIGINT or SIGTERM)."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(signal.Signals(signum).name)

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name


def _raise(signum, frame):
  raise Interrupted(signum)


@contextlib.contextmanager
def as_exceptions(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
  """Within the block, the signals raise `Interrupted` in the main thread (a no-op
  outside the main thread, where Python cannot install handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.signal(s, _raise) for s in signals}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


@contextlib.contextmanager
def deferred(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
  """Signals arriving within the block are raised as `Interrupted` when it ends, so what it
  does (saving a search's state) finishes whole."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  got = []
  old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signals}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  if got:
    raise Interrupted(got[0])
