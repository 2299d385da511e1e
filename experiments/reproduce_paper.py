"""Reproduce the paper's experiments on the embedded benchmark pool.

Runs the three 2-task settings, the 3-task setting and the top-N ablation
(N = 2, 4, 8, 16 on the 3-task setting), each into W/<setting>/, then writes
W/summary.md with the paper-style tables (Table 1, Table 3, held-out, weight density).

  python experiments/reproduce_paper.py --workdir=runs/paper [--pool=runs/pool/pool.json]
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = ("code_reasoning", "knowledge_reasoning", "math_knowledge", "code_reasoning_math")
TOP_N = (2, 4, 8, 16)
TOP_N_SETTING = "code_reasoning_math"
METHODS = ("best_single", "uniform", "merge_best", "search")


def runs() -> list[tuple[str, str, list[str]]]:
  out = [(s, s, []) for s in SETTINGS]
  out += [(f"top{n}", TOP_N_SETTING, [f"Experiment.top_n = {n}"]) for n in TOP_N]
  return out


def _cell(m: dict, task: str, split: str = "test") -> str:
  v = m["scores"][split].get(task)
  return "–" if v is None else f"{v:.1f}"


def summary(workdir: str) -> str:
  lines = ["# Paper reproduction on the embedded benchmark", "",
           "Search uses dev only; every number below is on the test split. Held-out tasks "
           "were never searched on.", ""]
  for name, setting, _ in runs():
    path = os.path.join(workdir, name, "results.json")
    if not os.path.exists(path):
      continue
    r = json.load(open(path))
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
    s = r["methods"]["search"]["fitness"]["test"]
    beats = [m for m in METHODS[:-1] if s > r["methods"][m]["fitness"]["test"]]
    lines += ["", f"Search beats on test: {', '.join(beats) or 'none'}.", ""]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--only", default="", help="comma-separated run names to (re)run")
  args = p.parse_args()
  from recycle_jax import cli
  only = set(filter(None, args.only.split(",")))
  for name, setting, bindings in runs():
    if only and name not in only:
      continue
    out = os.path.join(args.workdir, name)
    if os.path.exists(os.path.join(out, "results.json")) and not only:
      print(f"{name}: done, skipped")
      continue
    rc = cli.main(["search", f"--gin_file={ROOT}/gin_configs/settings/{setting}.gin",
                   f"--workdir={out}", "--overwrite",
                   f"--gin_bindings=Experiment.pool='{args.pool}'"] +
                  [f"--gin_bindings={b}" for b in bindings])
    if rc:
      return rc
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "summary.md"), "w") as f:
    f.write(summary(args.workdir))
  print(f"summary: {os.path.join(args.workdir, 'summary.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
