"""The fault-injection suite: every command against generated bad inputs (faults.py).

For each case: a non-zero exit, no traceback, exactly one `error:` line (and nothing else
on stderr at --log_level=error) naming the culprit, nothing written, every input
unchanged by checksum, finished within a bound. In-process (cli.main), so hundreds of
cases stay cheap; process-level behaviour (signals, stderr of native libraries, locks
held by another process) is in test_process.py.
"""
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import pytest

import faults
from recycle_jax import cli
from reliability_util import partials, snapshot

ALL_CASES = faults.all_cases()
# RJ_FAULTS=all (`make test-faults`, CI): every case; otherwise a stratified sample.
CASES = ALL_CASES if os.environ.get("RJ_FAULTS") == "all" else faults.sample(ALL_CASES)
LIMIT_S = float(os.environ.get("RJ_FAULT_LIMIT_S", 60))  # one case


@pytest.fixture(scope="session")
def world():
  return faults.world()


class CaseTimeout(BaseException):
  """Raised in the main thread when a case runs past LIMIT_S."""


def _alarm(signum, frame):
  _alarm.fired = True
  raise CaseTimeout(f"past {LIMIT_S}s")


def run_in_process(argv, as_user=None) -> tuple[object, str, float]:
  """(exit status or 'raised', what escaped as text, seconds). Past LIMIT_S the case is
  interrupted (and fails); stuck in native code past 5x that, the run dies with stacks."""
  faulthandler.dump_traceback_later(5 * LIMIT_S, exit=True, file=sys.__stderr__)
  _alarm.fired = False
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
  t0 = time.monotonic()
  escaped = ""
  try:
    if as_user is not None:
      os.setegid(as_user)
      os.seteuid(as_user)
    try:
      rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (what a user would see as a traceback)
      rc, escaped = "raised", traceback.format_exc()
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    if as_user is not None:
      os.seteuid(0)
      os.setegid(0)
    faulthandler.cancel_dump_traceback_later()
  if _alarm.fired:
    rc, escaped = "timeout", f"still running after {LIMIT_S}s"
  return rc, escaped, time.monotonic() - t0


def contents(*roots) -> dict:
  """snapshot() less directories' mtimes: a lock file beside a workdir, taken and
  released, changes its directory's mtime and nothing else."""
  return {p: v[1] if os.path.isdir(p) else v for p, v in snapshot(*roots).items()}


def _temp_siblings(path: str) -> list[str]:
  d, base = os.path.split(os.path.abspath(path))
  if not os.path.isdir(d):
    return []
  return [f for f in os.listdir(d) if f.startswith(base + ".") and
          any(t in f for t in (".partial-", ".tmp-", ".old-"))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fault(case, world, capsys):
  if not faults.can(case.needs):
    pytest.skip(f"this machine cannot {case.needs}")
  d = tempfile.mkdtemp(dir=world.root, prefix="case_")
  os.chmod(d, 0o755)
  try:
    s = case.build(world, d)
    before = contents(*s.inputs, d)
    rc, escaped, seconds = run_in_process(s.argv, s.as_user)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert not escaped and "Traceback" not in err, escaped or err
    assert rc not in (0, None), f"exit {rc}: accepted\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert any(str(c) in lines[0] for c in s.culprits), \
        f"names none of {s.culprits}: {lines[0]}"
    for p in s.outputs:
      assert not os.path.exists(p), f"{p} was written"
      assert not _temp_siblings(p) and not partials(p), f"temp siblings of {p} left"
    assert contents(*s.inputs, d) == before, "an input or the directory changed"
    assert seconds < LIMIT_S, f"took {seconds:.0f}s"
  finally:
    faults.unmount_all(d)
    shutil.rmtree(d, ignore_errors=True)


def test_generated_cases_cover_every_command_and_kind():
  """The generators find something to break in every command (a new command or an
  emptied generator shows here), and the sample meets every (command, kind) they do."""
  commands = {c.command for c in ALL_CASES}
  assert commands == set(faults.COMMANDS)
  kinds = {c.id.split(":")[1] for c in ALL_CASES}
  assert {"flag", "path", "gin", "checkpoint", "manifest", "hf-config", "hf-weights",
          "results", "resume-state", "output", "output-fs", "hf-member", "mergekit-config",
          "jsonl-task", "concurrent"} <= kinds
  # Hostile documents and lying headers reach every reader of their format: each JSON
  # file's kind, the mergekit YAML, JSONL lines, safetensors shards and weights files.
  details = {(c.id.split(":")[1], c.id.split(":")[-1]) for c in ALL_CASES}
  for kind in ("manifest", "hf-config", "results", "hf-member", "jsonl-task"):
    for hostile in ("deep-nesting", "huge-number", "lone-surrogate"):
      assert (kind, hostile) in details, (kind, hostile)
  for hostile in ("alias-bomb", "deep-nesting", "huge-number"):
    assert ("mergekit-config", hostile) in details
  for kind in ("hf-member", "hf-weights"):
    for lie in ("dtype-lie", "overlapping-ranges"):
      assert (kind, lie) in details, (kind, lie)
  assert {("output-fs", "no-inodes"), ("concurrent", "output-locked"),
          ("concurrent", "inside-locked-workdir")} <= details
  sample = faults.sample(ALL_CASES)
  assert {faults.stratum(c) for c in sample} == {faults.stratum(c) for c in ALL_CASES}
  assert len(sample) < len(ALL_CASES) / 4 and sample == faults.sample(ALL_CASES)


def test_an_unexpected_failure_is_one_line_with_a_hint_and_verbose_adds_the_traceback(
    world, monkeypatch, capsys):
  from recycle_jax.checkpoint_io import inspection
  monkeypatch.setattr(inspection, "pool_markdown",
                      lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
  assert cli.main(["inspect", world.pool]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("error: unexpected RuntimeError: a bug (recycle-jax inspect); rerun with "
                     "--verbose for the traceback, and report it")
  assert not any("Traceback" in line for line in err)
  assert cli.main(["inspect", world.pool, "--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "RuntimeError: a bug" in err
  assert err.strip().splitlines()[-1].startswith("error: unexpected RuntimeError")
