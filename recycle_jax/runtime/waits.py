"""Every wait has a bound: a read, write or save that never finishes (a hung network
filesystem, a dead disk) ends the command with one line instead of a hang.

`result(future)` bounds a concurrent.futures or TensorStore future, `call(fn)` a blocking
call (Orbax's wait_until_finished, opening a file, fsync); past `limit_s()` they raise
UserError and mark the process `stuck`: its threads may never return, so the CLI exits
without joining them. Multi-host barriers are bounded the same way (multihost.barrier).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable

from recycle_jax.runtime.errors import UserError

DEFAULT_S = 1800.0  # far beyond any healthy wait of the tiny-to-7B runs this serves
ENV = "RECYCLE_JAX_WAIT_S"  # a shorter or longer bound for a whole process
stuck = threading.Event()


def limit_s() -> float:
  try:
    return max(0.001, float(os.environ.get(ENV, DEFAULT_S)))
  except ValueError:
    return DEFAULT_S


def stuck_error(what: str, where: str, cause: str = "a hung or very slow filesystem?",
                fix: str = "check the disk or the network filesystem") -> UserError:
  """The one line for a wait past the bound; marks the process stuck."""
  stuck.set()
  return UserError(f"{what} did not finish within {limit_s():g} s ({cause})", where,
                   f"{fix} and rerun (or raise the bound: {ENV}=SECONDS)")


def result(future, what: str, where: str = "") -> Any:
  """future.result(), bounded: a concurrent.futures.Future or a tensorstore Future."""
  try:
    return future.result(timeout=limit_s())
  except (concurrent.futures.TimeoutError, TimeoutError):
    raise stuck_error(what, where) from None


def call(fn: Callable[[], Any], what: str, where: str = "") -> Any:
  """fn() on a daemon thread, waited for with the bound (for calls that take none)."""
  out: dict = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # noqa: BLE001 (re-raised on the caller's thread)
      out["error"] = e
  t = threading.Thread(target=run, daemon=True, name="bounded-wait")
  t.start()
  t.join(limit_s())
  if t.is_alive():
    raise stuck_error(what, where)
  if "error" in out:
    raise out["error"]
  return out.get("value")
