"""Every wait has a bound (waits.py): a read that never returns, here a real blocking
open of a FIFO nobody writes (as a hung network filesystem blocks), ends in one line."""
import concurrent.futures
import os
import threading
import time

import pytest

from recycle_jax import waits
from recycle_jax.errors import UserError


@pytest.fixture
def fifo(tmp_path, monkeypatch):
  """A FIFO without a writer (opening it to read blocks), released after the test."""
  monkeypatch.setenv(waits.ENV, "0.5")
  path = str(tmp_path / "stuck")
  os.mkfifo(path)
  yield path
  fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # lets the blocked reader go
  os.close(fd)
  waits.stuck.clear()


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_a_stuck_future_ends_in_one_line_within_the_bound(fifo):
  ex = concurrent.futures.ThreadPoolExecutor(1)
  t0 = time.monotonic()
  with pytest.raises(UserError) as e:
    waits.result(ex.submit(_read, fifo), "a read of the streaming merge", fifo)
  assert time.monotonic() - t0 < 5
  assert str(e.value).startswith("a read of the streaming merge did not finish within 0.5 s")
  assert fifo in str(e.value) and waits.ENV in str(e.value) and "\n" not in str(e.value)
  assert waits.stuck.is_set()  # the CLI then exits without joining the stuck thread
  ex.shutdown(wait=False)


def test_a_stuck_blocking_call_ends_in_one_line_and_a_quick_one_returns(fifo):
  with pytest.raises(UserError, match="saving the search state did not finish within"):
    waits.call(lambda: _read(fifo), "saving the search state", fifo)
  assert waits.call(lambda: 42, "x") == 42
  with pytest.raises(ZeroDivisionError):  # a failure is the call's own, on this thread
    waits.call(lambda: 1 / 0, "x")
  assert threading.current_thread() is threading.main_thread()
