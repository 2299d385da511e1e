"""One writer per output, a success only when the output is whole, and a resume only onto
the same inputs: output locks, the stale-sibling sweep by owner, `outputs.writing`, the
content fingerprints of the search signature, and the linear merge whose cost does not
grow with the pool's size."""
import json
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.checkpoint_io import checkpoints, pool_manifest
from recycle_jax.merging import kernels
from recycle_jax.runtime import locking, outputs
from recycle_jax.runtime.errors import UserError
from recycle_jax.search import loop


@pytest.fixture
def other_process():
  """A live process of this host (another writer), and the pid of one that is gone."""
  live = subprocess.Popen(["sleep", "600"])
  gone = subprocess.Popen(["true"])
  gone.wait()
  yield live.pid, gone.pid
  live.kill()
  live.wait()


def _hold(path: str, pid: int) -> None:
  with open(locking.lock_path(path), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "since": 0,
               "start": locking.process_start(pid)}, f)


def test_a_second_writer_of_an_output_is_refused_naming_the_holder(tmp_path, other_process):
  live, gone = other_process
  out = str(tmp_path / "out")
  _hold(out, live)
  with pytest.raises(UserError, match=f"output {out} is in use by pid {live}") as e:
    with outputs.writing(out, overwrite=False):
      pytest.fail("wrote while another process holds the output")
  assert locking.lock_path(out) in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["out.lock"]  # its lock left to its holder
  _hold(out, gone)  # a holder that is gone: its lock is taken over
  with outputs.writing(out, overwrite=False) as tmp:
    os.makedirs(tmp)
    assert os.path.exists(locking.lock_path(out))
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_reused_pid_does_not_keep_a_lock(tmp_path, other_process):
  live, _ = other_process
  out = str(tmp_path / "out")
  with open(locking.lock_path(out), "w") as f:  # this pid, but a process started earlier
    json.dump({"host": socket.gethostname(), "pid": live, "since": 0,
               "start": locking.process_start(live) - 1}, f)
  with outputs.writing(out, overwrite=False) as tmp:
    os.makedirs(tmp)
  assert os.path.isdir(out)


def test_an_output_inside_a_locked_workdir_is_refused(tmp_path, other_process):
  live, _ = other_process
  run = tmp_path / "run"
  run.mkdir()
  _hold(str(run), live)
  out = str(run / "sub" / "merged")
  with pytest.raises(UserError, match=f"lies inside the workdir {run}, in use by pid {live}"):
    with outputs.writing(out, overwrite=False):
      pytest.fail("wrote into a running search's workdir")
  assert sorted(os.listdir(run)) == []
  # the process holding the workdir writes into it (a search saving its merge)
  locking.release(locking.lock_path(str(run)))
  os.remove(locking.lock_path(str(run)))
  path = locking.acquire(str(run))
  try:
    with outputs.writing(out, overwrite=False) as tmp:
      os.makedirs(tmp)
  finally:
    locking.release(path)
  assert os.path.isdir(out)


def test_the_sweep_removes_only_siblings_whose_writer_is_gone(tmp_path, other_process):
  live, gone = other_process
  out = str(tmp_path / "out")
  host = locking.host_key()
  siblings = {
      "live": f"{out}.partial-{live}-{locking.process_start(live)}-{host}-0000aaaa",
      "gone": f"{out}.partial-{gone}-1-{host}-0000bbbb",
      "reused": f"{out}.partial-{live}-{locking.process_start(live) - 1}-{host}-0000cccc",
      "other-host": f"{out}.partial-{live}-1-ffffffff-0000dddd",
      "legacy": f"{out}.partial-0000eeee",  # an older version's: no owner, swept as before
      "orbax-tmp": f"{out}.partial-{gone}-1-{host}-0000bbbb.orbax-checkpoint-tmp-1",
  }
  for p in siblings.values():
    os.makedirs(p)
  tmp = outputs.temp_sibling(out)
  left = {k for k, p in siblings.items() if os.path.exists(p)}
  assert left == {"live", "other-host"}
  assert tmp.startswith(f"{out}.partial-{os.getpid()}-{locking.process_start(os.getpid())}-")


def test_a_failed_or_incomplete_write_leaves_nothing_and_reports_no_success(tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(RuntimeError, match="disk"):
    with outputs.writing(out, overwrite=False) as tmp:
      os.makedirs(tmp)
      os.makedirs(tmp + ".orbax-checkpoint-tmp-123")  # what a library left beside it
      raise RuntimeError("disk full")
  assert os.listdir(tmp_path) == []

  def incomplete(path):
    raise UserError("the written checkpoint does not read back whole", path)
  with pytest.raises(UserError, match="does not read back whole"):
    with outputs.writing(out, overwrite=False, verify=incomplete) as tmp:
      os.makedirs(tmp)
  assert os.listdir(tmp_path) == []


def test_a_saved_checkpoint_is_read_back_before_it_counts(tmp_path):
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
  out = str(tmp_path / "ckpt")
  checkpoints.save(out, params, {"note": "x"})
  checkpoints.reads_back(params)(out)  # what save checked
  with pytest.raises(UserError, match="does not read back whole"):
    checkpoints.reads_back({**params, "extra": np.zeros(2, np.float32)})(out)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ----------------------------------------------------------------------------- resume

def test_a_pool_fingerprint_follows_the_content(tmp_path):
  a = tmp_path / "a"
  (a / "d").mkdir(parents=True)
  (a / "_METADATA").write_text('{"x": 1}')
  (a / "d" / "data").write_bytes(b"\0" * 100_000)
  first = pool_manifest.fingerprint(str(a))
  assert pool_manifest.fingerprint(str(a)) == first
  (a / "_METADATA").write_text('{"x": 2}')  # same size, same second: the bytes differ
  second = pool_manifest.fingerprint(str(a))
  assert second != first
  st = os.stat(a / "d" / "data")
  (a / "d" / "data").write_bytes(b"\1" * 100_000)  # a large file: size and time
  os.utime(a / "d" / "data", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
  assert pool_manifest.fingerprint(str(a)) != second


def _saved(tmp_path, sig: dict) -> str:
  state = tmp_path / "search_state"
  state.mkdir()
  (state / "signature.json").write_text(json.dumps(sig))
  return str(state)


@pytest.mark.parametrize("key, change, words", [
    ("pool[c]", "other", "pool member 'c' (its files) differs from the saved search's"),
    ("dev[rj_math]", "other", "dev split of task 'rj_math'"),
    ("base", "other", "base checkpoint differs"),
    ("pool[d]", "new", "pool member 'd' (its files) is new"),
    ("pool[c]", "gone", "pool member 'c' (its files) is gone"),
])
def test_resume_refuses_changed_inputs_naming_them(tmp_path, key, change, words):
  cfg = loop.SearchConfig()
  space = __import__("recycle_jax.merging.spaces", fromlist=["x"]).MergeSpace(n=3)
  inputs = {"pool[a]": "1", "pool[b]": "2", "pool[c]": "3", "base": "4",
            "dev[rj_math]": "5"}
  saved = _saved(tmp_path, loop.signature(cfg, space, None, inputs))
  now = dict(inputs)
  if change == "other":
    now[key] = "9"
  elif change == "new":
    now[key] = "9"
  else:
    del now[key]
  loop.check_signature(saved, loop.signature(cfg, space, None, inputs))  # same: resumes
  with pytest.raises(UserError, match="cannot resume: the " + words.replace("(", r"\(")
                     .replace(")", r"\)")):
    loop.check_signature(saved, loop.signature(cfg, space, None, now))


def test_dev_fingerprint_follows_the_examples():
  from recycle_jax.evaluation import task_data
  d = task_data.TaskData(tokens=np.ones((4, 8), np.int32), target_mask=np.ones((4, 8), bool),
                         name="t", kind="exact", split="dev", examples=4)
  more = d.replace(tokens=np.ones((8, 8), np.int32), target_mask=np.ones((8, 8), bool),
                   examples=8)
  other = d.replace(tokens=np.full((4, 8), 2, np.int32))
  fps = {loop.data_fingerprint(x) for x in (d, more, other)}
  assert len(fps) == 3 and loop.data_fingerprint(d) == loop.data_fingerprint(d)


# ----------------------------------------------------------------------------- merge cost

def test_the_accumulated_linear_merge_equals_the_one_program_merge():
  rng = np.random.default_rng(0)
  pool = [{"a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
           "b": {"c": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}} for _ in range(7)]
  w = rng.dirichlet(np.ones(7)).astype(np.float32)
  merged, finite = kernels.linear_accumulated(w, pool)
  want = jax.jit(kernels.linear)(w, tuple(pool))
  assert bool(finite)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    assert x.dtype == y.dtype
    # the same sum in the same order; the one program may fuse multiply-adds (1 ulp)
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=2e-6, atol=1e-7)
  pool[3] = {**pool[3], "a": pool[3]["a"].at[0, 0].set(jnp.nan)}
  assert not bool(kernels.linear_accumulated(w, pool)[1])
