"""Bad input: one `error:` line, exit status 2, nothing written or changed, found early.

Complements tests/test_cli.py (weight count, missing manifest, unknown search task, gin
binding typo, missing gin file) and tests/test_checkpoints.py (validation at the API).
"""
import os
import shutil

import pytest

from reliability_util import (TASKS, assert_rejected, partials, pool_dir, pool_paths, run_cli,
                              tiny_search_args, write_manifest)
from reliability_util import no_array_reads, odd_checkpoints, tiny_pool  # noqa: F401 fixtures
from recycle_jax.checkpoint_io import checkpoints  # noqa: E402


@pytest.fixture
def out(tmp_path):
  return tmp_path / "out"


def _merge(pool, out, weights="1,1,1", *extra):
  return ["merge", f"--pool={pool}", f"--weights={weights}", f"--output={out}", *extra]


def _pool_with(tmp_path, tiny_pool, name, path) -> str:
  """The tiny pool's a and b plus one more checkpoint."""
  p = pool_paths(tiny_pool)
  return write_manifest(tmp_path / "pool.json", {"a": p["a"], "b": p["b"], name: path})


def _damaged_copy(tiny_pool, tmp_path, subdir: str, every: bool = False) -> str:
  """A pool whose checkpoint b has its largest file under `subdir` (or `every` file
  there: many arrays then fail at once) cut in half."""
  src = pool_paths(tiny_pool)
  shutil.copytree(src["b"], tmp_path / "b")
  files = [os.path.join(tmp_path / "b" / subdir, f) for f in os.listdir(tmp_path / "b" / subdir)]
  for victim in files if every else [max(files, key=os.path.getsize)]:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  return write_manifest(tmp_path / "pool.json", {"a": src["a"], "b": tmp_path / "b",
                                                  "c": src["c"]})


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_checkpoint_dir(kind, tiny_pool, tmp_path, out, capsys,
                                         no_array_reads):
  if kind == "empty":
    os.makedirs(tmp_path / "x")
  pool = _pool_with(tmp_path, tiny_pool, "x", tmp_path / "x")
  what = "not found" if kind == "missing" else "is empty"
  assert_rejected(capsys, _merge(pool, out), f"checkpoint directory {what}", "'x'",
                  untouched=[pool_dir(tiny_pool)], absent=[out])
  assert_rejected(capsys, tiny_search_args(pool, out), what, "'x'",
                  untouched=[pool_dir(tiny_pool)], absent=[out])


@pytest.mark.parametrize("subdir,what", [("ocdbt.process_0/d", "data"), ("d", "metadata")])
def test_truncated_checkpoint_file(subdir, what, tiny_pool, tmp_path, out, capsys):
  pool = _damaged_copy(tiny_pool, tmp_path, subdir)
  untouched = [pool_dir(tiny_pool), tmp_path / "b"]
  assert_rejected(capsys, _merge(pool, out), f"checkpoint {what} is unreadable", "'b'",
                  untouched=untouched, absent=[out])
  # An existing workdir is not touched, even with --overwrite: inputs are read first.
  os.makedirs(out)
  (out / "keep.txt").write_text("old run")
  assert_rejected(capsys, tiny_search_args(pool, out, "--overwrite"),
                  f"checkpoint {what} is unreadable", "'b'", untouched=[*untouched, out])


def test_truncated_checkpoint_from_a_real_process(tiny_pool, tmp_path, out):
  """The exit status and stderr of `recycle-jax merge` itself: the one line, nothing else
  (every data file of b cut: many concurrent reads fail, not just the first)."""
  pool = _damaged_copy(tiny_pool, tmp_path, "ocdbt.process_0/d", every=True)
  rc, log = run_cli(_merge(pool, out) + ["--log_level=error"], tmp_path, "merge.log")
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  assert rc == 2 and log.strip().splitlines() == errors and len(errors) == 1, log
  assert "checkpoint data is unreadable" in errors[0] and "'b'" in errors[0]
  assert not out.exists() and not partials(out)


def test_reads_abandoned_by_a_failed_restore_are_not_logged(tiny_pool, tmp_path):
  """Orbax stops at the first failed read; asyncio logs the other reads' failures, "exception
  was never retrieved" and a TensorStore traceback, whenever their futures are collected (a
  race, seen on a loaded machine). Here such a future is made for certain, failed with the
  real read error, and dropped after a failed restore: no record reaches a handler."""
  import asyncio
  import gc
  import logging

  import orbax.checkpoint as ocp
  from recycle_jax.checkpoint_io import checkpoints
  from recycle_jax.runtime import quiet
  from recycle_jax.runtime.errors import UserError
  b = pool_paths(_damaged_copy(tiny_pool, tmp_path, "ocdbt.process_0/d", every=True))["b"]
  abstract = checkpoints.read_metadata(b).abstract
  try:
    ocp.StandardCheckpointer().restore(b, abstract)
  except Exception as e:  # noqa: BLE001 (the error Orbax's read raised)
    read_error = e

  def abandon(error: Exception) -> list:
    """The "never retrieved" records for one dropped read failed with `error`."""
    async def read():
      raise error

    async def start():
      return asyncio.gather(read())
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("asyncio").addHandler(handler)
    loop = asyncio.new_event_loop()
    try:
      future = loop.run_until_complete(start())
      loop.run_until_complete(asyncio.sleep(0.01))
      assert future.done()
      del future
      gc.collect()
    finally:
      loop.close()
      logging.getLogger("asyncio").removeHandler(handler)
    return [r for r in seen if r.exc_info and r.exc_info[1] is error]

  logging.getLogger("asyncio").removeFilter(quiet.ABANDONED_READS)
  assert len(abandon(read_error)) == 1  # what a user saw on stderr before the fix
  with pytest.raises(UserError, match="checkpoint data is unreadable"):
    checkpoints.restore(b, abstract, "b")
  assert abandon(read_error) == []
  assert len(abandon(ValueError("not a read"))) == 1  # other failures still show


@pytest.mark.parametrize("kind,needle", [
    ("wide", "model config differs from 'a': d_ff 48 vs 32"),
    ("half", "dtype float16 but 'a' has float32"),
    ("extra", "parameter 'extra/bias' is not in 'a'"),
])
def test_pool_mismatch(kind, needle, tiny_pool, odd_checkpoints, tmp_path, out, capsys,
                       no_array_reads):
  pool = _pool_with(tmp_path, tiny_pool, kind, odd_checkpoints[kind])
  assert_rejected(capsys, _merge(pool, out), needle, f"'{kind}'", absent=[out],
                  untouched=[pool_dir(tiny_pool), odd_checkpoints[kind]])
  assert_rejected(capsys, tiny_search_args(pool, out), needle, absent=[out])


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_checkpoint_is_named_and_nothing_is_written(kind, tiny_pool,
                                                              odd_checkpoints, tmp_path,
                                                              out, capsys):
  pool = _pool_with(tmp_path, tiny_pool, kind, odd_checkpoints[kind])
  # Zero weight does not help: 0 * NaN is NaN, so the whole pool must be clean.
  for weights in ("1,1,1", "1,1,0"):
    assert_rejected(capsys, _merge(pool, out, weights), "NaN or Inf", f"['{kind}']",
                    absent=[out], untouched=[pool_dir(tiny_pool), odd_checkpoints[kind]])
  if kind == "nan":  # the search finds it in the merges of its first (seed) batch
    assert_rejected(capsys, tiny_search_args(pool, out), "NaN or Inf", "['nan']",
                    absent=[out])


def test_merge_finds_nonfinite_in_the_merge_pass_only(tiny_pool, odd_checkpoints, tmp_path,
                                                      out, monkeypatch):
  """No extra pass over the data: every checkpoint is read once, NaN or not."""
  from recycle_jax import cli
  reads = []
  real = checkpoints.restore
  monkeypatch.setattr(checkpoints, "restore",
                      lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
  assert cli.main(_merge(tiny_pool, out)) == 0
  assert sorted(reads) == sorted(pool_paths(tiny_pool).values())
  reads.clear()
  pool = _pool_with(tmp_path, tiny_pool, "nan", odd_checkpoints["nan"])
  assert cli.main(_merge(pool, tmp_path / "out2")) == 2
  assert sorted(reads) == sorted(pool_paths(pool).values())


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("weights,needle", [
    ("1,-1,1", "negative weight -1"),
    ("0,0,0", "all weights are zero"),
    ("a,b,c", "weights must be numbers"),
])
def test_bad_explicit_weights(weights, needle, tiny_pool, out, capsys, no_array_reads):
  assert_rejected(capsys, _merge(tiny_pool, out, weights), needle, "--weights",
                  untouched=[pool_dir(tiny_pool)], absent=[out])


# ----------------------------------------------------------------------------- tasks, gin

@pytest.mark.parametrize("tasks,split,needle", [
    ("rj_knowledge", "nope", "task 'rj_knowledge' has no split 'nope'"),
    ("rj_nope", "test", "unknown task 'rj_nope'"),
])
def test_eval_unknown_task_or_split(tasks, split, needle, tiny_pool, tmp_path, capsys,
                                    no_array_reads):
  scores = tmp_path / "scores.json"
  assert_rejected(capsys, ["eval", f"--checkpoint={pool_paths(tiny_pool)['a']}",
                           f"--tasks={tasks}", f"--split={split}", f"--output={scores}"],
                  needle, untouched=[pool_dir(tiny_pool)], absent=[scores])


@pytest.mark.parametrize("text,needle", [
    ("Experiment.tasks = ['rj_code'\n", "syntax error"),
    ("Experiment.taskz = ['rj_code']\n", "doesn't have a parameter named 'taskz'"),
    ("Experimnt.tasks = ['rj_code']\n", "No configurable matching 'Experimnt'"),
])
def test_invalid_gin_file(text, needle, tiny_pool, tmp_path, out, capsys, no_array_reads):
  gin_file = tmp_path / "bad.gin"
  gin_file.write_text(text)
  line = assert_rejected(capsys, tiny_search_args(tiny_pool, out, f"--gin_file={gin_file}"),
                         "invalid gin config", needle, absent=[out])
  assert str(gin_file) in line


# ----------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_output_overlapping_an_input_checkpoint(where, tiny_pool, capsys, no_array_reads):
  a = pool_paths(tiny_pool)["a"]
  target = {"is": a, "inside": os.path.join(a, "sub"), "contains": pool_dir(tiny_pool)}[where]
  untouched = [pool_dir(tiny_pool)]
  for overwrite in ([], ["--overwrite"]):
    assert_rejected(capsys, _merge(tiny_pool, target, "1,1,1", *overwrite),
                    "overlaps input", "--output", untouched=untouched)
    assert_rejected(capsys, tiny_search_args(tiny_pool, target, *overwrite),
                    "overlaps input", "--workdir", untouched=untouched)
  assert_rejected(capsys, ["eval", f"--checkpoint={a}", f"--tasks={TASKS[0]}",
                           f"--output={os.path.join(a, 'scores.json')}"],
                  "overlaps input", untouched=untouched)
  assert not os.path.exists(os.path.join(a, "sub"))


def test_existing_output_needs_overwrite(tiny_pool, tmp_path, out, capsys, no_array_reads):
  os.makedirs(out)
  (out / "keep.txt").write_text("an earlier result")
  untouched = [pool_dir(tiny_pool), out]
  assert_rejected(capsys, _merge(tiny_pool, out), "already exists", "--overwrite",
                  untouched=untouched)
  assert_rejected(capsys, tiny_search_args(tiny_pool, out), "is not empty", "--overwrite",
                  untouched=untouched)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_search_overwrite_puts_the_old_workdir_back(tiny_pool, tmp_path, out, capsys,
                                                           monkeypatch):
  """--overwrite replaces a workdir only once the new run is complete: a run that fails
  after the old one was set aside (here its search hits a full disk) puts it back whole."""
  import errno

  from recycle_jax import cli, experiment
  from reliability_util import snapshot
  os.makedirs(out)
  (out / "results.json").write_text("an earlier result")
  before = snapshot(out)

  def full_disk(shared, cfg, space, scorer, workdir, *a):
    assert os.path.isfile(os.path.join(workdir, "config.gin"))  # the new run had begun
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir, "x"))
  monkeypatch.setattr(experiment, "search_once", full_disk)
  assert cli.main(tiny_search_args(tiny_pool, out, "--overwrite")) == 2
  assert capsys.readouterr().err.startswith("error: No space left on device")
  assert snapshot(out) == before
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no WORKDIR.old-*, no lock left


def _other_filesystem(near) -> str | None:
  """A fresh writable directory on another filesystem than `near` (/dev/shm), or None."""
  d = "/dev/shm"
  if (not os.path.isdir(d) or not os.access(d, os.W_OK) or
      os.stat(d).st_dev == os.stat(near).st_dev):
    return None
  import tempfile
  return tempfile.mkdtemp(dir=d, prefix="rj_exdev_")


@pytest.mark.parametrize("extra", [[], ["--streaming"]])
def test_output_on_another_filesystem(extra, tiny_pool, tmp_path):
  """Inputs on one filesystem, the output on another (a rename across them fails with
  EXDEV): the temporary sibling is written in the output's own directory, so every rename
  stays on its filesystem; an earlier output there is replaced the same way."""
  from recycle_jax import cli
  from reliability_util import snapshot
  other = _other_filesystem(tmp_path) or pytest.skip("no second writable filesystem")
  try:
    out = os.path.join(other, "merged")
    before = snapshot(pool_dir(tiny_pool))
    for again in ([], ["--overwrite"]):
      assert cli.main(_merge(tiny_pool, out, "1,1,2", *extra, *again)) == 0
      assert sorted(os.listdir(other)) == ["merged"]  # no temporary sibling left
    assert snapshot(pool_dir(tiny_pool)) == before
    merged, _ = checkpoints.restore_local(out)
    a, _ = checkpoints.restore_local(pool_paths(tiny_pool)["a"])
    assert merged["embed"]["embedding"].shape == a["embed"]["embedding"].shape
  finally:
    shutil.rmtree(other, ignore_errors=True)
