"""Beyond the paper, on the embedded pool: merge spaces, more baselines, other strategies.

  python experiments/beyond_paper.py --workdir=runs/beyond [--pool=runs/pool/pool.json]
      [--setting=gin_configs/settings/code_instruct.gin] [--num_seeds=3]
      [--gin_bindings=Experiment.max_examples=64] [--only=cma_es_linear,snes_linear]

Each run goes to W/<name>/ with --num_seeds seeds and the same budget and search seeds
(single checkpoints, uniform, merge_best, greedy soup); the first also scores the
task-vector baselines (against the pool's base) and runs a Pareto sweep.
W/summary.md: test and dev fitness (mean ± 95% CI over seeds) and hypervolumes per run.
"""
import argparse
import json
import os
import sys

import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)

RUNS = (  # name, gin bindings
    ("cma_es_linear", ["SweepConfig.num_weights = 3", "SweepConfig.budget = 24"]),
    ("cma_es_layerwise", ["SearchConfig.merge_space = 'layerwise'"]),
    ("cma_es_ties", ["SearchConfig.merge_space = 'ties'"]),
    ("sep_cma_es_linear", ["SearchConfig.strategy = 'Sep_CMA_ES'"]),
    ("snes_linear", ["SearchConfig.strategy = 'SNES'"]),
    ("random_linear", ["SearchConfig.strategy = 'RandomSearch'"]),
)


def _pm(stat: dict) -> str:
  if stat is None or stat["mean"] is None:
    return "–"
  return f"{stat['mean']:.1f}" + ("" if stat["ci95"] is None else f" ± {stat['ci95']:.1f}")


def summary(workdir: str) -> str:
  lines = ["# Beyond the paper on the embedded pool", "",
           "Every search: the same budget and seeds; numbers are mean ± 95% CI (t) over seeds.",
           "", "| run | test fitness | dev fitness | hypervolume dev (search front) | "
           "hypervolume test |", "|---|---|---|---|---|"]
  first = None
  for name, _ in RUNS:
    path = os.path.join(workdir, name, "results.json")
    if not os.path.exists(path):
      continue
    r = json.load(open(path))
    first = first or r
    s = r["seeds"]["methods"]["search"]["fitness"] if "seeds" in r else None
    hv = r.get("seeds", {}).get("hypervolume", {})
    lines.append(f"| {name} | {_pm(s and s['test'])} | {_pm(s and s['dev'])} | "
                 f"{_fmt_hv(hv.get('dev', {}).get('search'))} | "
                 f"{_fmt_hv(hv.get('test', {}).get('search'))} |")
  if first:
    lines += ["", f"Baselines (seed-independent), tasks {', '.join(first['tasks'])}:", "",
              "| method | test fitness | dev fitness | hypervolume test |", "|---|---|---|---|"]
    hv = first.get("pareto", {}).get("hypervolume", {}).get("test", {})
    for m, v in first["methods"].items():
      if m != "search":
        lines.append(f"| {m} | {v['fitness']['test']} | {v['fitness']['dev']} | "
                     f"{_fmt_hv(hv.get(m))} |")
    lines += ["", f"Pool front hypervolume (test): {_fmt_hv(hv.get('pool'))}; every evaluated "
              f"merge incl. the sweep: {_fmt_hv(hv.get('all'))}."]
  return "\n".join(lines) + "\n"


def _fmt_hv(v) -> str:
  if v is None:
    return "–"
  if isinstance(v, dict):
    return "–" if v["mean"] is None else f"{v['mean']:.4f} ± {v['ci95'] or 0:.4f}"
  return f"{v:.4f}"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", default="runs/beyond")
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--setting", default="gin_configs/settings/code_instruct.gin")
  p.add_argument("--num_seeds", type=int, default=3)
  p.add_argument("--only", default="", help="comma-separated run names")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="added to every run, e.g. Experiment.max_examples=64")
  args = p.parse_args()
  os.chdir(runner.ROOT)
  base = os.path.join(os.path.dirname(os.path.abspath(args.pool)), "base")
  only = [n for n in args.only.split(",") if n]
  # Task-vector baselines (and spaces) need the base; the seeds are the same everywhere.
  jobs = [(args.setting, os.path.join(args.workdir, name), bindings +
           ([f"Experiment.base = '{base}'"] if i == 0 or "ties" in name else []) +
           args.gin_bindings,
           [f"--num_seeds={args.num_seeds}"])
          for i, (name, bindings) in enumerate(RUNS) if not only or name in only]
  return runner.run_all(jobs, args.pool, args.workdir, summary)


if __name__ == "__main__":
  sys.exit(main())
