"""Reproduce the paper's experiments on the embedded benchmark pool.

Runs the paper's three 2-task settings' analogues (code-instruct, code-reasoning,
instruct-knowledge) and math-reasoning, the 3-task setting and the top-N ablation
(N = 2, 4, 8, 16 on the 3-task setting), each into W/<setting>/, then writes
W/summary.md with the paper-style tables (Table 1, Table 3, held-out, weight density).

  python experiments/reproduce_paper.py --workdir=runs/paper [--pool=runs/pool/pool.json]
"""
import argparse
import json
import os
import sys

import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)

SETTINGS = ("code_instruct", "code_reasoning", "instruct_knowledge", "math_reasoning",
            "code_instruct_reasoning")
TOP_N = (2, 4, 8, 16)
BUDGET = 96  # merges per search (`make demo` uses the same)
TOP_N_SETTING = "code_instruct_reasoning"
METHODS = ("best_single", "uniform", "merge_best", "search")


def runs() -> list[tuple[str, str, list[str]]]:
  budget = [f"SearchConfig.budget = {BUDGET}"]
  out = [(s, s, budget) for s in SETTINGS]
  out += [(f"top{n}", TOP_N_SETTING, budget + [f"Experiment.top_n = {n}"]) for n in TOP_N]
  return out


def _cell(m: dict, task: str, split: str = "test") -> str:
  v = m["scores"][split].get(task)
  return "–" if v is None else f"{v:.1f}"


def _load(workdir: str) -> dict[str, dict]:
  out = {}
  for name, _, _ in runs():
    path = os.path.join(workdir, name, "results.json")
    if os.path.exists(path):
      out[name] = json.load(open(path))
  return out


def _held_out_avg(m: dict, held_out) -> float | None:
  vals = [m["scores"]["test"].get(t) for t in held_out]
  return None if not vals or None in vals else sum(vals) / len(vals)


def summary(workdir: str) -> str:
  results = _load(workdir)
  lines = ["# Paper reproduction on the embedded benchmark", "",
           "Search uses dev only; every number below is on the test split. Held-out tasks "
           "were never searched on.", "",
           "## Overview: test fitness (held-out average in parentheses)", "",
           "| run | " + " | ".join(METHODS) + " | search beats | non-zero weights |",
           "|" + "---|" * (len(METHODS) + 3)]
  for name, r in results.items():
    held_out = r.get("report_tasks", [])
    cells = []
    for m in METHODS:
      res = r["methods"][m]
      ho = _held_out_avg(res, held_out)
      cells.append(f"{res['fitness']['test']:.1f}" + ("" if ho is None else f" ({ho:.1f})"))
    s = r["methods"]["search"]
    beats = [m for m in METHODS[:-1] if s["fitness"]["test"] > r["methods"][m]["fitness"]["test"]]
    nz = sum(w > 1e-6 for w in s["weights"])
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(beats) or 'none'} | "
                 f"{nz}/{len(s['weights'])} |")
  lines.append("")
  for name, r in results.items():
    tasks, held_out = r["tasks"], r.get("report_tasks", [])
    lines += [f"## {name} ({', '.join(tasks)})", "",
              "| method | " + " | ".join(tasks) + " | avg | " + " | ".join(held_out) +
              " | non-zero weights |", "|" + "---|" * (len(tasks) + len(held_out) + 3)]
    for m in METHODS:
      res = r["methods"][m]
      nz = sum(w > 1e-6 for w in res["weights"])
      lines.append(f"| {m} | " + " | ".join(_cell(res, t) for t in tasks) +
                   f" | {res['fitness']['test']:.1f} | " +
                   " | ".join(_cell(res, t) for t in held_out) + f" | {nz}/{len(res['weights'])} |")
    lines.append("")
  top = [results[f"top{n}"] for n in TOP_N if f"top{n}" in results]
  if len(top) > 1:
    from recycle_jax import figures
    figures.top_n_ablation(top, os.path.join(workdir, "figures", "top_n.png"))
    lines += ["## Top-N ablation", "", "![top-N ablation](figures/top_n.png)", ""]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--only", default="", help="comma-separated run names to (re)run")
  args = p.parse_args()
  only = set(filter(None, args.only.split(",")))
  jobs = []
  for name, setting, bindings in runs():
    out = os.path.join(args.workdir, name)
    if only and name not in only:
      continue
    if os.path.exists(os.path.join(out, "results.json")) and not only:
      print(f"{name}: done, skipped")
      continue
    jobs.append((setting, out, bindings, ()))
  return runner.run_all(jobs, args.pool, args.workdir, summary)


if __name__ == "__main__":
  sys.exit(main())
