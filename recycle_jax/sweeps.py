"""Sweeps in the XManager style: trials are dicts of gin bindings, built with
`sweep`, `product` and `zipit` (like `xmanager.hyper`), run as local processes.

  trials = product(sweep("SearchConfig.strategy", ["CMA_ES", "SNES"]),
                   zipit(sweep("SearchConfig.seed", [0, 1]),
                         sweep("SearchConfig.sigma_init", [0.5, 1.0])))

A sweep file is Python (`TRIALS`, optional `GIN_FILES`, `BINDINGS`) or JSON
(`trials`, or `product` / `zipit` as {binding: [values]}, and `gin_files`, `bindings`).
Trial k runs `recycle-jax search` in WORKDIR/trial_k; a trial with results.json is done.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import runpy
import subprocess
import sys
from typing import Any, Sequence

from recycle_jax.search import baselines
from recycle_jax.runtime.outputs import write_text as atomic_write_text
from recycle_jax.runtime.errors import UserError, check

Trial = dict[str, Any]  # gin binding name -> value
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_DIR = os.path.join(ROOT, "experiments", "sweeps")
REPORT_METHODS = baselines.HEADLINE


# ----------------------------------------------------------------------------- algebra

def sweep(name: str, values: Sequence) -> list[Trial]:
  return [{name: v} for v in values]


def product(*sweeps: Sequence[Trial]) -> list[Trial]:
  """Every combination; later sweeps vary fastest."""
  out: list[Trial] = [{}]
  for s in sweeps:
    out = [{**a, **b} for a in out for b in s]
  return out


def zipit(*sweeps: Sequence[Trial]) -> list[Trial]:
  """Element-wise union of equally long sweeps."""
  lengths = sorted({len(s) for s in sweeps})
  check(len(lengths) <= 1, f"zipit needs sweeps of one length, got lengths {lengths}",
        "sweep definition", "give every zipped sweep the same number of values")
  return [{k: v for d in group for k, v in d.items()} for group in zip(*sweeps)]


def binding(name: str, value: Any) -> str:
  # Gin references/macros ('@fn()', '%MACRO') are written raw; everything else as a literal.
  raw = isinstance(value, str) and value[:1] in ("@", "%")
  return f"{name}={value if raw else repr(value)}"


# ----------------------------------------------------------------------------- specs

@dataclasses.dataclass(frozen=True)
class SweepSpec:
  name: str
  trials: tuple  # of Trial
  gin_files: tuple = ()
  bindings: tuple = ()  # shared by every trial, before the trial's own


def _from_dict(name: str, d: dict) -> SweepSpec:
  d = {k.lower(): v for k, v in d.items()}  # Python files use upper-case names
  trials = list(d.get("trials") or [])
  for key, combine in (("product", product), ("zipit", zipit)):
    if d.get(key):
      trials += combine(*[sweep(k, v) for k, v in d[key].items()])
  check(bool(trials) and all(isinstance(t, dict) for t in trials),
        "the sweep defines no trials", name,
        "define TRIALS (Python) or 'trials' / 'product' / 'zipit' (JSON)")
  # Relative gin files: from the current directory, else from the repository root.
  files = [os.path.abspath(f) if os.path.exists(f) else os.path.join(ROOT, f)
           for f in d.get("gin_files", ())]
  return SweepSpec(name, tuple(trials), tuple(files), tuple(d.get("bindings", ())))


def load_spec(name_or_file: str, extra_bindings: Sequence[str] = ()) -> SweepSpec:
  """A sweep file, or NAME for experiments/sweeps/NAME.py; extra bindings go last."""
  path = name_or_file
  if not os.path.isfile(path):
    path = os.path.join(SWEEP_DIR, f"{name_or_file}.py")
  known = sorted(f[:-3] for f in os.listdir(SWEEP_DIR) if f.endswith(".py")) \
      if os.path.isdir(SWEEP_DIR) else []
  check(os.path.isfile(path), f"unknown sweep {name_or_file!r}", "--sweep",
        f"pass a .py/.json sweep file or one of {known}")
  if path.endswith(".json"):
    try:
      with open(path) as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"sweep file is not valid JSON: {e}", path) from None
  else:
    d = {k: v for k, v in runpy.run_path(path).items() if k.isupper()}
  spec = _from_dict(path, d)
  return dataclasses.replace(spec, bindings=spec.bindings + tuple(extra_bindings))


# ----------------------------------------------------------------------------- trials

def trial_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, f"trial_{k}")


def is_done(workdir: str, k: int) -> bool:
  return os.path.isfile(os.path.join(trial_dir(workdir, k), "results.json"))


def trial_args(spec: SweepSpec, trial: Trial, out: str) -> list[str]:
  """`recycle-jax search` arguments of one trial (also what XManager submits)."""
  args = ["search", f"--workdir={out}"] + [f"--gin_file={f}" for f in spec.gin_files]
  args += [f"--gin_bindings={b}" for b in spec.bindings]
  args += [f"--gin_bindings={binding(k, v)}" for k, v in trial.items()]
  if os.path.isdir(out) and os.listdir(out):
    args.append("--resume")  # an interrupted trial continues from its search checkpoint
  return args


def record_spec(spec: SweepSpec, workdir: str) -> None:
  # Trial k is only "done" if it ran the same trial: refuse a workdir of another sweep.
  path = os.path.join(workdir, "sweep_spec.json")
  now = json.loads(json.dumps(dataclasses.asdict(spec), default=str))
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    check(old["trials"] == now["trials"] and old["bindings"] == now["bindings"],
          "the workdir holds a different sweep", workdir,
          "use a new --workdir for a changed sweep")
  else:
    atomic_write_text(path, json.dumps(now, indent=1))


def run_local(spec: SweepSpec, workdir: str, parallel: int = 1,
              python: str = sys.executable) -> dict[int, str]:
  """Runs unfinished trials, `parallel` at a time; returns {k: status}."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  record_spec(spec, workdir)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}

  def run(k: int) -> str:
    if is_done(workdir, k):
      return "done (skipped)"
    out = trial_dir(workdir, k)
    cmd = [python, "-m", "recycle_jax.cli"] + trial_args(spec, spec.trials[k], out)
    log = f"{out}.log"
    with open(log, "w") as f:
      f.write(" ".join(cmd) + "\n")
      f.flush()
      rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return "done" if rc == 0 and is_done(workdir, k) else \
        f"failed (exit {rc}; see {os.path.basename(log)})"

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as ex:
    return dict(zip(range(len(spec.trials)), ex.map(run, range(len(spec.trials)))))


# ----------------------------------------------------------------------------- summary

def summarize(spec: SweepSpec, workdir: str, status: dict[int, str] | None = None) -> list[dict]:
  """One row per trial: its bindings, status and fitness of each method."""
  rows = []
  for k, trial in enumerate(spec.trials):
    row = {"trial": k, "bindings": trial, "workdir": trial_dir(workdir, k),
           "status": (status or {}).get(k) or ("done" if is_done(workdir, k) else "not run"),
           "fitness": {}}
    if is_done(workdir, k):
      with open(os.path.join(trial_dir(workdir, k), "results.json")) as f:
        res = json.load(f)
      row["fitness"] = {m: res["methods"][m]["fitness"] for m in REPORT_METHODS
                        if m in res["methods"]}
      row["merges_evaluated"] = sum(h["kind"] == "search" for h in res["history"])
    rows.append(row)
  return rows


def _short(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def _cell(v) -> str:
  return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def summary_markdown(spec: SweepSpec, rows: list[dict]) -> str:
  keys = list(dict.fromkeys(k for t in spec.trials for k in t))
  head = ["trial"] + [_short(k) for k in keys] + ["status", "search dev"] + \
         [f"{m} test" for m in REPORT_METHODS]
  lines = [f"# sweep {os.path.basename(spec.name)}", "",
           "Fitness = macro-average score over the searched tasks.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    fit = r["fitness"]
    cells = [r["trial"]] + [r["bindings"].get(k) for k in keys] + [r["status"]]
    cells += [fit.get("search", {}).get("dev")]
    cells += [fit.get(m, {}).get("test") for m in REPORT_METHODS]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def write_summary(spec: SweepSpec, workdir: str, status: dict[int, str] | None = None
                  ) -> list[dict]:
  rows = summarize(spec, workdir, status)
  atomic_write_text(os.path.join(workdir, "sweep.json"), json.dumps(rows, indent=1))
  atomic_write_text(os.path.join(workdir, "sweep.md"), summary_markdown(spec, rows))
  return rows
