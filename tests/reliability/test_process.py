"""Process-level behaviour of the CLI: what reaches stderr, Ctrl-C / SIGTERM during a
search, one writer per workdir (a lock held by a live process, a stale one).

The in-process cases are in test_faults.py; these need a real process (signals, the
native libraries' output on file descriptor 2) or a real holder of a lock.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from recycle_jax import cli
from recycle_jax.runtime import locking
from reliability_util import (ROOT, cli_env, pool_dir, run_cli, snapshot, start_cli,
                              tiny_search_args, wait_for)
from reliability_util import tiny_pool  # noqa: F401 fixture

pytestmark = pytest.mark.slow  # real processes, signals and locks: `make test-slow` (CI)


def test_stderr_is_the_one_error_line(tmp_path):
  """No oneDNN/CUDA/absl start-up lines: native libraries are imported (gin bindings
  import every configurable, TensorFlow through seqio), and stderr holds the error line
  alone."""
  env = {k: v for k, v in cli_env(tmp_path).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  missing = tmp_path / "missing.json"
  proc = subprocess.run([sys.executable, "-m", "recycle_jax.cli", "search",
                         f"--workdir={tmp_path / 'run'}",
                         f"--gin_bindings=Experiment.pool = {str(missing)!r}",
                         "--gin_bindings=Experiment.tasks = ['rj_code']", "--log_level=error"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: pool manifest not found ({missing}); pass --pool=DIR/pool.json (run "
      "`recycle-jax make-pool` to build one)"], proc.stderr
  # The noise was there to filter: a gin binding imports user_tasks (TensorFlow, seqio).
  assert "tensorflow" in subprocess.run(
      [sys.executable, "-c", "import recycle_jax.cli, gin, sys; from recycle_jax import "
       "user_tasks; print(' '.join(m for m in sys.modules if m == 'tensorflow'))"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300).stdout


def _steps(workdir) -> list[int]:
  d = os.path.join(workdir, "search_state")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


# Long enough that the signal lands mid-search: a tiny pool's generation takes tens of ms,
# so a short search can finish while the second (refused) search is still starting.
GENERATIONS = 300

@pytest.mark.parametrize("signum,resume", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_signal_ends_a_search_with_one_line_and_it_resumes(signum, resume, tiny_pool,
                                                           tmp_path, capsys):
  """While the search runs: a second search on its workdir is refused naming the holder;
  the signal ends it with one line and the lock released; --resume finishes it."""
  run = tmp_path / "run"
  args = tiny_search_args(tiny_pool, run, "--gin_bindings=Experiment.save_merged=False",
                          "--gin_bindings=Experiment.greedy_soup=False", budget=7 * GENERATIONS)
  before = snapshot(pool_dir(tiny_pool))
  proc = start_cli(args + ["--log_level=error"], tmp_path, "search.log")
  assert wait_for(lambda: any(s > 0 for s in _steps(run)), proc, timeout=300), \
      (tmp_path / "search.log").read_text()
  assert cli.main(tiny_search_args(tiny_pool, run, "--resume")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"in use by pid {proc.pid} on host {socket.gethostname()}" in err[0]
  proc.send_signal(signum)
  assert proc.wait(120) == 128 + signum
  log = (tmp_path / "search.log").read_text()
  lines = [line for line in log.splitlines() if line.strip()]
  assert lines == [f"error: interrupted by {signal.Signals(signum).name} (recycle-jax "
                   "search); the search state is saved after every generation: rerun with "
                   "--resume to continue"], log
  assert not os.path.exists(locking.lock_path(run))
  done = max(_steps(run))
  assert 0 < done < GENERATIONS
  if not resume:
    return
  # The budget, alone of the config, may change on resume: one generation more finishes it.
  rc, log = run_cli(args + ["--resume", f"--gin_bindings=SearchConfig.budget={7 * (done + 1)}"],
                    tmp_path, "resumed.log")
  assert rc == 0, log
  results = json.load(open(run / "results.json"))
  assert results["methods"]["search"]
  assert len([h for h in results["history"] if h["kind"] == "search"]) == 7 * (done + 1)
  assert snapshot(pool_dir(tiny_pool)) == before


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tiny_pool, tmp_path, capsys):
  run = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  try:
    with open(locking.lock_path(run), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": holder.pid}, f)
    assert cli.main(tiny_search_args(tiny_pool, run, budget=7)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0], err
    assert locking.lock_path(run) in err[0] and not run.exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock is stale, taken over, and released at the end.
  assert cli.main(tiny_search_args(tiny_pool, run, budget=7,)
                  + ["--gin_bindings=Experiment.greedy_soup=False"]) == 0
  assert not os.path.exists(locking.lock_path(run))
  # A lock from another host cannot be checked from here: refused, naming that host.
  with open(locking.lock_path(run), "w") as f:
    json.dump({"host": "elsewhere", "pid": 1}, f)
  assert cli.main(tiny_search_args(tiny_pool, run, "--resume", budget=7)) == 2
  assert "in use by pid 1 on host elsewhere" in capsys.readouterr().err


def test_a_workdir_under_missing_directories(tiny_pool, tmp_path, capsys):
  """`make demo` on a fresh checkout: runs/ does not exist yet. The directories above the
  workdir are made (the lock lives beside the workdir); a command that fails removes them."""
  failed = tmp_path / "a" / "b" / "run"
  assert cli.main(tiny_search_args(tmp_path / "missing.json", failed, budget=7)) == 2
  assert "pool manifest not found" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()
  run = tmp_path / "c" / "d" / "run"
  with locking.workdir_lock(str(run)):  # what search and make-pool do, then fill it
    assert os.path.exists(locking.lock_path(run))
    os.makedirs(run)
  assert run.is_dir() and not os.path.exists(locking.lock_path(run))
  (tmp_path / "file").write_text("x")  # a file where a directory must go: one line
  assert cli.main(tiny_search_args(tiny_pool, tmp_path / "file" / "run", budget=7)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow  # a search signalled mid-run (`make test-slow`, CI)
def test_an_interrupted_overwrite_puts_the_old_workdir_back(tiny_pool, tmp_path):
  """Ctrl-C during `search --overwrite`: the finished run it was replacing is back as it
  was, no sibling is left, and the line does not suggest --resume (it would resume the
  old run, not the interrupted one)."""
  run = tmp_path / "run"
  rc, log = run_cli(tiny_search_args(tiny_pool, run, "--gin_bindings=Experiment.save_merged=False",
                                     "--gin_bindings=Experiment.greedy_soup=False", budget=7),
                    tmp_path, "first.log")
  assert rc == 0, log
  before = snapshot(run)
  args = tiny_search_args(tiny_pool, run, "--overwrite", "--gin_bindings=Experiment.save_merged=False",
                          "--gin_bindings=Experiment.greedy_soup=False", budget=7 * GENERATIONS)
  proc = start_cli(args + ["--log_level=error"], tmp_path, "search.log")
  assert wait_for(lambda: any(s > 0 for s in _steps(run)) and not (run / "results.json").exists(),
                  proc, timeout=300), (tmp_path / "search.log").read_text()
  proc.send_signal(signal.SIGINT)
  assert proc.wait(120) == 128 + signal.SIGINT
  lines = [x for x in (tmp_path / "search.log").read_text().splitlines() if x.strip()]
  assert len(lines) == 1 and "put back unchanged" in lines[0] and "--resume" not in lines[0], lines
  assert snapshot(run) == before
  assert not [n for n in os.listdir(tmp_path) if n.startswith("run.")]  # no sibling
