"""Reproduce the paper's experiments on the embedded benchmark pool, K seeds each.

Runs the paper's three 2-task settings' analogues (code-instruct, code-reasoning,
instruct-knowledge) and math-reasoning, the 3-task setting and the top-N ablation
(N = 2, 4, 8, 16 on the 3-task setting), each K times (`recycle-jax search --num_seeds=K`:
W/<run>/seed_k), then writes W/summary.md: per setting, mean ± 95% CI (t-distribution) of
test fitness for the search and every baseline, the paired difference search - best
baseline with its CI and the verdict it supports, the non-zero weights per seed and the
held-out averages.

  python experiments/reproduce_paper.py --workdir=runs/paper [--pool=runs/pool/pool.json]
      [--num_seeds=5] [--only=code_instruct,top8]
"""
import argparse
import os
import sys

import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)

SETTINGS = ("code_instruct", "code_reasoning", "instruct_knowledge", "math_reasoning",
            "code_instruct_reasoning")
TOP_N = (2, 4, 8, 16)
BUDGET = 96  # merges per search (`make demo` uses the same)
TOP_N_SETTING = "code_instruct_reasoning"


def runs() -> list[tuple[str, str, list[str]]]:
  budget = [f"SearchConfig.budget = {BUDGET}"]
  out = [(s, s, budget) for s in SETTINGS]
  out += [(f"top{n}", TOP_N_SETTING, budget + [f"Experiment.top_n = {n}"]) for n in TOP_N]
  return out


def summary(workdir: str) -> str:
  results = {name: r for name, _, _ in runs()
             if (r := runner.seed_results(os.path.join(workdir, name)))}
  lines = ["# Paper reproduction on the embedded benchmark", "",
           "Search uses dev only; every number below is on the test split (mean ± 95% CI, "
           "t-distribution, over the search seeds; the baselines do not depend on the seed). "
           "Held-out tasks were never searched on. The verdict follows from the paired "
           "difference search - best baseline (the baseline with the highest mean test "
           "fitness: the strongest competitor): beats / loses when its whole CI is above / "
           "below 0, ties otherwise.", ""]
  lines += runner.overview_table(results) + [""]
  for name, rs in results.items():
    lines += runner.setting_section(name, rs) + [""]
  lines += runner.timing_lines(workdir, [name for name, _, _ in runs()])
  top = [results[f"top{n}"][0] for n in TOP_N if f"top{n}" in results]
  if len(top) > 1:
    from recycle_jax.reporting import figures
    figures.top_n_ablation(top, os.path.join(workdir, "figures", "top_n.png"))
    lines += ["## Top-N ablation (seed 0's runs)", "", "![top-N ablation](figures/top_n.png)",
              ""]
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--only", default="", help="comma-separated run names to (re)run")
  p.add_argument("--num_seeds", type=int, default=5, help="search seeds per run (K)")
  args = p.parse_args()
  if args.num_seeds < 1:
    print(f"error: --num_seeds={args.num_seeds} (reproduce_paper); pass 1 or more",
          file=sys.stderr)
    return 2
  only = set(filter(None, args.only.split(",")))
  jobs = []
  for name, setting, bindings in runs():
    out = os.path.join(args.workdir, name)
    if only and name not in only:
      continue
    if runner.done(out, args.num_seeds) and not only:
      print(f"{name}: done, skipped")
      continue
    jobs.append((setting, out, bindings, (f"--num_seeds={args.num_seeds}",)))
  return runner.run_all(jobs, args.pool, args.workdir, summary)


if __name__ == "__main__":
  sys.exit(main())
