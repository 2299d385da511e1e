"""What the reproduction scripts share: run one `recycle-jax search` (timed), read its
seeds back, and the seeded tables of a summary."""
import json
import os
import sys
import time
from typing import Callable, Iterable, Sequence
from recycle_jax.reporting import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ORACLE = "best_per_task"  # a checkpoint per task: no single model, never 'the best baseline'


def search(setting: str, workdir: str, pool: str, bindings: Sequence[str] = (),
           flags: Sequence[str] = ()) -> int:
  """`recycle-jax search` with a setting's gin file into `workdir` (overwritten); its wall
  time goes to workdir/timing.json."""
  from recycle_jax import cli
  from recycle_jax.runtime.outputs import write_text as atomic_write_text
  gin_file = setting if setting.endswith(".gin") else \
      os.path.join(ROOT, "gin_configs", "settings", f"{setting}.gin")
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)  # its lock's folder
  start = time.perf_counter()
  rc = cli.main(["search", f"--gin_file={gin_file}", f"--workdir={workdir}",
                 "--overwrite", f"--gin_bindings=Experiment.pool='{pool}'", *flags] +
                [f"--gin_bindings={b}" for b in bindings])
  if rc == 0:
    atomic_write_text(os.path.join(workdir, "timing.json"), json.dumps(
        {"wall_s": round(time.perf_counter() - start, 1), "flags": list(flags),
         "bindings": list(bindings)}))
  return rc


def seed_results(run_dir: str) -> list[dict]:
  """Each seed's results.json of a run (workdir/seed_k for --num_seeds > 1, else the run's
  own), in seed order; [] when the run has not finished."""
  if not os.path.exists(os.path.join(run_dir, "results.json")):
    return []
  k, out = 0, []
  while os.path.exists(path := os.path.join(run_dir, f"seed_{k}", "results.json")):
    out.append(json.load(open(path)))
    k += 1
  return out or [json.load(open(os.path.join(run_dir, "results.json")))]


def done(run_dir: str, num_seeds: int) -> bool:
  return len(seed_results(run_dir)) == num_seeds


def write_summary(workdir: str, text: str, name: str = "summary.md") -> str:
  from recycle_jax.runtime.outputs import write_text as atomic_write_text
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  atomic_write_text(path, text)
  print(f"summary: {path}")
  return path


def run_all(jobs: Iterable[tuple[str, str, Sequence[str], Sequence[str]]], pool: str,
            workdir: str, summary: Callable[[str], str], name: str = "summary.md") -> int:
  """Runs (setting, run workdir, bindings, flags) searches in order, then the summary."""
  for setting, out, bindings, flags in jobs:
    rc = search(setting, out, pool, bindings, flags)
    if rc:
      return rc
  write_summary(workdir, summary(workdir), name)
  return 0


# ----------------------------------------------------------------------------- seeded tables

def nonzero(weights, tol: float = 1e-6) -> int:
  return sum(w > tol for w in weights)


def held_out_avg(m: dict, held_out: Sequence[str]) -> float | None:
  vals = [m["scores"]["test"].get(t) for t in held_out]
  return None if not vals or None in vals else sum(vals) / len(vals)


def methods_of(runs: Sequence[dict]) -> list[str]:
  """Methods present in every seed, the search first."""
  from recycle_jax.reporting import records
  names = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
  return records._ordered(names)


def test_fitness(runs: Sequence[dict], method: str) -> list[float | None]:
  return [r["methods"][method]["fitness"]["test"] for r in runs]


def best_baseline(runs: Sequence[dict]) -> str:
  """The baseline with the highest mean test fitness (the oracle excluded)."""
  import numpy as np
  cands = [m for m in methods_of(runs) if m not in ("search", ORACLE)]
  return max(cands, key=lambda m: np.nanmean([np.nan if v is None else v
                                              for v in test_fitness(runs, m)]))


def comparison(runs: Sequence[dict]) -> dict:
  """search - best baseline over seeds: {'baseline', 'mean', 'ci95', 'n', 'verdict'}."""
  base = best_baseline(runs)
  return {"baseline": base, **statistics.paired(test_fitness(runs, "search"),
                                               test_fitness(runs, base))}


def _signed(c: dict) -> str:
  if c["n"] == 0:
    return "–"
  return f"{c['mean']:+.1f}" + (f" ± {c['ci95']:.1f}" if c["n"] > 1 else "")


def overview_table(results: dict[str, list[dict]]) -> list[str]:
  lines = ["## Overview: test fitness, mean ± 95% CI over seeds", "",
           "| run | seeds | search | best baseline | search - best baseline | verdict | "
           "non-zero weights (per seed) |", "|---|---|---|---|---|---|---|"]
  for name, rs in results.items():
    c = comparison(rs)
    nz = [nonzero(r["methods"]["search"]["weights"]) for r in rs]
    lines.append(f"| {name} | {len(rs)} | {statistics.fmt_ci(test_fitness(rs, 'search'))} | "
                 f"{c['baseline']} {statistics.fmt_ci(test_fitness(rs, c['baseline']))} | "
                 f"{_signed(c)} | {c['verdict']} | {', '.join(map(str, nz))} of "
                 f"{len(rs[0]['methods']['search']['weights'])} |")
  return lines


def setting_section(name: str, runs: Sequence[dict]) -> list[str]:
  """Per method: test/dev fitness and held-out average (mean ± CI), non-zero weights."""
  tasks, held_out = runs[0]["tasks"], runs[0].get("report_tasks", [])
  lines = [f"## {name} ({', '.join(tasks)}; held out: {', '.join(held_out) or 'none'})", "",
           "| method | " + " | ".join(f"{t} test" for t in tasks) +
           " | test fitness | dev fitness | held-out avg | non-zero weights |",
           "|" + "---|" * (len(tasks) + 5)]
  for m in methods_of(runs):
    rows = [r["methods"][m] for r in runs]
    nz = [nonzero(x["weights"]) for x in rows] if rows[0]["weights"] else []
    span = "–" if not nz else f"{min(nz)}" if min(nz) == max(nz) else f"{min(nz)}–{max(nz)}"
    lines.append(
        f"| {m} | " + " | ".join(statistics.fmt_ci([x["scores"]["test"].get(t) for x in rows])
                                 for t in tasks) +
        f" | {statistics.fmt_ci([x['fitness']['test'] for x in rows])}"
        f" | {statistics.fmt_ci([x['fitness']['dev'] for x in rows])}"
        f" | {statistics.fmt_ci([held_out_avg(x, held_out) for x in rows])}"
        f" | {span} |")
  c = comparison(runs)
  lines += ["", f"search - {c['baseline']} (paired over {c['n']} seeds): {_signed(c)} test "
            f"points: **{c['verdict']}**."]
  return lines


def timing_lines(workdir: str, names: Sequence[str]) -> list[str]:
  walls = {}
  for n in names:
    path = os.path.join(workdir, n, "timing.json")
    if os.path.exists(path):
      walls[n] = json.load(open(path))["wall_s"]
  if not walls:
    return []
  return ["## Wall time", "", "| run | wall (s, all seeds) |", "|---|---|"] + [
      f"| {n} | {w:.0f} |" for n, w in walls.items()] + [
      f"| total | {sum(walls.values()):.0f} |", ""]
