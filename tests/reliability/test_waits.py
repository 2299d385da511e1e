"""Every wait has a bound (waits.py): a read that never returns, here a real blocking
open of a FIFO nobody writes (as a hung network filesystem blocks), ends in one line."""
import concurrent.futures
import os
import threading
import time

import pytest

from recycle_jax.runtime import waits
from recycle_jax.runtime.errors import UserError


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


# Two real processes (jax.distributed on CPU): process 1 never reaches the barrier, so
# process 0's wait must end in one line within the bound; a broadcast works both ways.
PROGRAM = """
import sys, time
from recycle_jax.runtime import multihost, waits
from recycle_jax.runtime.errors import UserError
multihost.initialize()
import jax
me = jax.process_index()
print("token", multihost.broadcast("token", f"from-{me}"), flush=True)
multihost.barrier("together")
if me == 1:
  time.sleep(30)
  sys.exit(0)
t0 = time.monotonic()
try:
  multihost.barrier("alone")
except UserError as e:
  print(f"refused after {time.monotonic() - t0:.1f} s: {e}", flush=True)
  print("stuck", waits.stuck.is_set(), flush=True)
  import os; os._exit(3)
"""


@pytest.mark.slow  # two JAX processes (`make test-slow`)
def test_a_barrier_another_process_never_reaches_ends_in_one_line(monkeypatch):
  import sys
  from tools import local_multihost
  monkeypatch.setenv(waits.ENV, "3")  # the processes' environment is this one's
  procs = local_multihost.launch([sys.executable, "-c", PROGRAM], devices=1)
  try:
    out = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert "token from-0" in out[0] and "token from-0" in out[1], out  # process 0's value
  assert procs[0].returncode == 3, out[0]
  line = next(x for x in out[0].splitlines() if x.startswith("refused after"))
  assert float(line.split()[2]) < 20, line
  assert "the barrier 'alone'" in line and "process 0 of 2" in line, line
  assert "did not finish within 3 s (another process failed" in line, line
  assert waits.ENV in line, line
  assert "stuck True" in out[0]


def test_the_streaming_merges_own_blocking_calls_are_bounded(fifo):
  """fsync of the output tree, and a data file opened on the summing thread (mapped
  reads): a FIFO in their place blocks in open() as a hung filesystem would."""
  from recycle_jax.merging.streaming import pipeline
  with pytest.raises(UserError, match="an fsync of the merged checkpoint did not finish"):
    pipeline.fsync_tree(os.path.dirname(fifo))
  waits.stuck.clear()
  reader = pipeline.Reader.__new__(pipeline.Reader)  # only its file table
  reader.fds, reader.lock = {}, threading.Lock()
  t0 = time.monotonic()
  with pytest.raises(UserError, match="opening a data file did not finish within 0.5 s"):
    reader._fd(fifo)
  assert time.monotonic() - t0 < 5 and reader.fds == {}


def test_a_restore_that_hangs_ends_in_one_line(tmp_path, monkeypatch):
  """A pool member whose data file blocks (a FIFO in its place, as a hung network
  filesystem would): the Orbax restore ends at the bound, naming the checkpoint."""
  import shutil
  from recycle_jax.checkpoint_io import checkpoints
  from reliability_util import write_checkpoint
  path = write_checkpoint(str(tmp_path / "ckpt"), seed=0)
  data = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
          if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep and "ocdbt" in d]
  assert data, sorted(os.listdir(path))
  for f in data:
    os.remove(f)
    os.mkfifo(f)
  monkeypatch.setenv(waits.ENV, "2")
  t0 = time.monotonic()
  try:  # (Orbax may read the arrays' metadata from the data files: then that read blocks)
    with pytest.raises(UserError, match=r"reading the checkpoint('s metadata)? did not finish "
                       r"within 2 s .*checkpoint 'a' at"):
      checkpoints.restore_local(path, "a")
    assert time.monotonic() - t0 < 30
  finally:
    for f in data:  # let a blocked reader go
      try:
        os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:  # nobody is reading this one
        pass
    waits.stuck.clear()
    shutil.rmtree(path, ignore_errors=True)


def test_a_json_input_that_blocks_is_refused_within_the_bound(fifo):
  """Manifests, Hugging Face configs, tokenizer JSON, results: one strict reader, bounded."""
  from recycle_jax.runtime import validation
  t0 = time.monotonic()
  with pytest.raises(UserError, match="reading the pool manifest did not finish within 0.5 s"):
    validation.load_json(fifo, "pool manifest")
  assert time.monotonic() - t0 < 5
