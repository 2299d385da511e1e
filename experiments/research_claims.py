"""The paper's claims, measured (issue 18): seeds x strategies x parametrizations x fidelity.

For each setting, every combination of a search strategy (evosax CMA_ES, Optuna's
CmaEsSampler `optuna_cmaes`: the paper's), a weight parametrization (relu_normalize,
softmax, box: the paper's) and a fidelity mode (full: every candidate on the whole dev
split; adaptive: successive halving) is searched with K seeds (`--num_seeds`), then
W/claims.md gets one table (test fitness mean ± 95% CI, dev fitness, the dev->test gap,
search - best baseline and its verdict, non-zero weights, dev examples evaluated, wall time
per merge) and W/figures/fidelity.png (test fitness against dev examples evaluated, both
fidelity modes; and the best dev fitness so far against cumulative dev examples).
`--dev_sizes` adds the dev-size study: the first configuration at each dev split size
(all 128 test examples per task, whatever --max_examples), its dev->test gap.

  python experiments/research_claims.py --workdir=runs/claims --settings=code_instruct \\
      --num_seeds=3 --budget=48 --max_examples=64
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)
from recycle_jax.reporting import statistics


def grid(args) -> list[dict]:
  """The runs: every (strategy, parametrization, fidelity) of the product, or `--configs`,
  on every setting; then the dev-size study's."""
  combos = ([tuple(c.split("-")) for c in args.configs] if args.configs else
            list(itertools.product(args.strategies, args.parametrizations, args.fidelities)))
  out = []
  for setting, (strategy, param, fid) in itertools.product(args.settings, combos):
    out.append({"name": f"{setting}/{strategy}-{param}-{fid}{args.tag}", "setting": setting,
                "strategy": strategy, "parametrization": param, "fidelity": fid,
                "dev_size": None})
  for setting, size in itertools.product(args.settings if args.dev_sizes else (),
                                         args.dev_sizes):
    strategy, param, fid = combos[0]  # the first configuration, at each dev size
    out.append({"name": f"{setting}/dev{size}-{strategy}-{param}-{fid}{args.tag}",
                "setting": setting,
                "strategy": strategy, "parametrization": param, "fidelity": fid,
                "dev_size": size})
  return out


def bindings(run: dict, args) -> list[str]:
  b = [f"SearchConfig.budget = {args.budget}", f"SearchConfig.strategy = '{run['strategy']}'",
       f"SearchConfig.parametrization = '{run['parametrization']}'",
       "Experiment.save_merged = False", "Experiment.greedy_soup = False", *args.bindings]
  if run["fidelity"] == "adaptive":
    b += [f"SearchConfig.fidelity_subset = {args.subset}",
          f"SearchConfig.fidelity_promote = {args.promote}"]
  # The dev-size study keeps the whole test split (128 per task): only dev changes.
  if args.max_examples and run["dev_size"] is None:
    b.append(f"Experiment.max_examples = {args.max_examples}")
  return b


def flags(run: dict, args) -> list[str]:
  f = [f"--num_seeds={args.num_seeds}"]
  return f + ([f"--dev_size={run['dev_size']}"] if run["dev_size"] else [])


def row(run: dict, rs: list[dict]) -> dict:
  s = [r["methods"]["search"] for r in rs]
  c = runner.comparison(rs)
  test = [x["fitness"]["test"] for x in s]
  dev = [x["fitness"]["dev"] for x in s]
  cfg = [r["config"] for r in rs]
  return {**run, "seeds": len(rs), "test": statistics.mean_ci(test), "dev": statistics.mean_ci(dev),
          "gap": statistics.mean_ci([d - t for d, t in zip(dev, test)]), "vs": c,
          "nonzero": [runner.nonzero(x["weights"]) for x in s],
          # Density of everything the search proposed, not just its best point.
          "candidates_nonzero": float(np.mean([runner.nonzero(h["weights"]) for r in rs
                                               for h in r["history"] if h["kind"] == "search"])),
          "dev_examples": float(np.mean([c_.get("dev_examples_evaluated", np.nan) for c_ in cfg])),
          # Seconds per merge: the mean over seeds counts compiles (a seed's subsets may
          # pack into new shapes), the fastest seed shows the steady state.
          "per_merge_s": [c_.get("search_wall_s", np.nan) / c_["search"]["budget"]
                          for c_ in cfg],
          "dev_size": run["dev_size"] or sum(cfg[0].get("dev_examples", {}).values())
          // max(1, len(cfg[0].get("dev_examples", {})))}


def _ci(stat) -> str:
  m, h, n = stat
  return "–" if n == 0 else f"{m:.1f}" + (f" ± {h:.1f}" if n > 1 else "")


def table(rows: list[dict]) -> list[str]:
  lines = ["| setting | strategy | parametrization | fidelity | seeds | test fitness | "
           "dev fitness | dev - test | search - best baseline | verdict | non-zero weights "
           "of the best (mean; per seed) | of all candidates (mean) | dev examples evaluated | "
           "s per merge (mean; fastest seed) |",
           "|" + "---|" * 14]
  for r in rows:
    v = r["vs"]
    vs = "–" if v["n"] == 0 else f"{v['mean']:+.1f}" + (f" ± {v['ci95']:.1f}" if v["n"] > 1 else "")
    lines.append(
        f"| {r['setting']} | {r['strategy']} | {r['parametrization']} | {r['fidelity']} | "
        f"{r['seeds']} | {_ci(r['test'])} | {_ci(r['dev'])} | {_ci(r['gap'])} | {vs} "
        f"({v['baseline']}) | {v['verdict']} | {np.mean(r['nonzero']):.1f}; "
        f"{', '.join(map(str, r['nonzero']))} | {r['candidates_nonzero']:.1f} | "
        f"{r['dev_examples']:.0f} | "
        f"{np.mean(r['per_merge_s']):.2f}; {np.min(r['per_merge_s']):.2f} |")
  return lines


def dev_size_table(rows: list[dict]) -> list[str]:
  lines = ["| setting | dev examples per task | seeds | search dev fitness | search test "
           "fitness | dev - test | search - best baseline (test) | verdict |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    v = r["vs"]
    vs = f"{v['mean']:+.1f}" + (f" ± {v['ci95']:.1f}" if v["n"] > 1 else "")
    lines.append(f"| {r['setting']} | {r['dev_size']} | {r['seeds']} | {_ci(r['dev'])} | "
                 f"{_ci(r['test'])} | {_ci(r['gap'])} | {vs} ({v['baseline']}) | "
                 f"{v['verdict']} |")
  return lines


def config_of(r: dict) -> str:
  return f"{r['strategy']}-{r['parametrization']}-{r['fidelity']}"


def pooled_table(rows: list[dict], results: dict[str, list[dict]], reference: str
                 ) -> list[str]:
  """Each configuration over every setting and seed: test fitness, search - best baseline
  and config - `reference` paired by (setting, seed), density, cost and time."""
  by = {}
  for r in rows:
    by.setdefault(config_of(r), {})[r["setting"]] = r
  ref = by.get(reference, {})
  def test(r):
    return runner.test_fitness(results[r["name"]], "search")
  lines = [f"| configuration | settings × seeds | test fitness | search - best baseline | "
           f"verdict | - {reference} | verdict | non-zero weights of the best | of all "
           "candidates | dev examples (vs full) | - the same at full fidelity | "
           "s per merge (median) |",
           "|" + "---|" * 12]
  for c, per in by.items():
    t, vs, dref, dfull, nz, cand, ex, sec = [], [], [], [], [], [], [], []
    for setting, r in per.items():
      rs = results[r["name"]]
      base = runner.test_fitness(rs, runner.best_baseline(rs))
      t += test(r)
      vs += [a - b for a, b in zip(test(r), base)]
      if setting in ref and c != reference:
        dref += [a - b for a, b in zip(test(r), test(ref[setting]))]
      nz += r["nonzero"]
      cand.append(r["candidates_nonzero"])
      sec += r["per_merge_s"]
      full = by.get(f"{r['strategy']}-{r['parametrization']}-full", {}).get(setting)
      if full is not None:
        ex.append(r["dev_examples"] / full["dev_examples"])
        if full is not r:
          dfull += [a - b for a, b in zip(test(r), test(full))]
    pv, pr, pf = (statistics.paired(d, [0] * len(d)) for d in (vs, dref, dfull))
    sig = lambda p: "–" if p["n"] == 0 else f"{p['mean']:+.1f} ± {p['ci95']:.1f}"
    lines.append(f"| {c} | {len(per)} × {len(t) // max(1, len(per))} | {statistics.fmt_ci(t)} | "
                 f"{sig(pv)} | {pv['verdict']} | {sig(pr)} | "
                 f"{pr['verdict'] if pr['n'] else '–'} | {np.mean(nz):.1f} | "
                 f"{np.mean(cand):.1f} | {np.mean(ex):.2f} | "
                 f"{sig(pf)}{', ' + pf['verdict'] if pf['n'] else ''} | {np.median(sec):.2f} |")
  return lines


def figure(rows: list[dict], results: dict[str, list[dict]], path: str) -> None:
  """Left: each configuration's test fitness (mean ± CI) against the dev examples its
  search evaluated, full vs adaptive. Right: the best full-fidelity dev fitness of the
  search's own candidates so far against cumulative dev examples, mean over the searches
  of the (setting, strategy, parametrization) run in both modes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  style = {"full": ("o", "tab:blue"), "adaptive": ("^", "tab:orange")}
  key = lambda r: (r["setting"], r["strategy"], r["parametrization"])
  both = {key(r) for r in rows if r["fidelity"] == "full"} & {
      key(r) for r in rows if r["fidelity"] == "adaptive"}
  for r in rows:
    mk, col = style[r["fidelity"]]
    m, h, _ = r["test"]
    a.errorbar(r["dev_examples"], m, yerr=0 if not np.isfinite(h) else h, fmt=mk, color=col,
               alpha=0.8, capsize=3)
    a.annotate(f"{r['setting'][:12]} {r['strategy'][:6]} {r['parametrization'][:4]}",
               (r["dev_examples"], m), fontsize=6, alpha=0.7)
  for f, (mk, col) in style.items():
    a.plot([], [], mk, color=col, label=f)
    curves = []
    for r in [r for r in rows if r["fidelity"] == f and key(r) in both]:
      for res in results[r["name"]]:
        h = [x for x in res["history"] if x["kind"] == "search"]
        ex = np.cumsum([x["dev_examples"] for x in h])
        fit = [x["fitness"] if x["fidelity"] >= 1 and x["fitness"] is not None else -np.inf
               for x in h]
        curves.append((ex, np.maximum.accumulate(fit)))
    if curves:
      grid_x = np.linspace(0, max(c[0][-1] for c in curves), 50)
      ys = [np.interp(grid_x, c[0], np.where(np.isfinite(c[1]), c[1], np.nan)) for c in curves]
      b.plot(grid_x, np.nanmean(ys, 0), color=col, label=f"{f} ({len(curves)} searches)")
  a.set(xlabel="dev examples evaluated by the search", ylabel="test fitness (mean ± 95% CI)",
        title="test fitness vs evaluation cost")
  b.set(xlabel="cumulative dev examples", ylabel="best dev fitness so far (full fidelity)",
        title="search candidates, configurations run in both modes")
  a.legend(); b.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary(workdir: str, runs: list[dict], args) -> str:
  results = {r["name"]: rs for r in runs
             if (rs := runner.seed_results(os.path.join(workdir, r["name"])))}
  rows = [row(r, results[r["name"]]) for r in runs if r["name"] in results]
  is_size = lambda r: r["name"].split("/")[1].startswith("dev")
  main, sizes = [r for r in rows if not is_size(r)], [r for r in rows if is_size(r)]
  lines = ["# The paper's claims, measured", "",
           f"Scale: {args.num_seeds} seeds per configuration, budget {args.budget} merges, "
           f"max_examples {args.max_examples or 'all'} per split and task (dev and test), "
           f"adaptive fidelity subset {args.subset}, promote {args.promote}; no greedy soup; "
           f"extra bindings: {'; '.join(args.bindings) or 'none (warm start on)'}. "
           "Mean ± 95% CI (t-distribution) over seeds; the verdict follows from the paired "
           "difference's CI (search - the baseline with the best mean test fitness).", ""]
  lines += table(main) + [""]
  if main:
    lines += [f"## Every setting pooled (paired by setting and seed; reference "
              f"{args.reference})", ""] + pooled_table(main, results, args.reference) + [""]
    ref = {r["setting"]: results[r["name"]] for r in main if config_of(r) == args.reference}
    if ref:
      lines += [f"## Seeded reproduction: {args.reference}, every baseline", ""]
      lines += runner.overview_table(ref) + [""]
      for setting, rs in ref.items():
        lines += runner.setting_section(setting, rs) + [""]
  if sizes:
    lines += ["## Dev split size (test fixed at 128 per task)", ""] + dev_size_table(sizes) + [""]
  if main:
    figure(main, results, os.path.join(workdir, "figures", "fidelity.png"))
    lines += ["![fidelity](figures/fidelity.png)", ""]
  from recycle_jax.runtime.outputs import write_text as atomic_write_text
  atomic_write_text(os.path.join(workdir, "claims.json"),
                    json.dumps(rows, default=float, indent=1))
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  split = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--workdir", required=True)
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--settings", type=split, default=["code_instruct", "code_reasoning"])
  p.add_argument("--strategies", type=split, default=["CMA_ES", "optuna_cmaes"])
  p.add_argument("--parametrizations", type=split, default=["relu_normalize", "softmax", "box"])
  p.add_argument("--fidelities", type=split, default=["full", "adaptive"])
  p.add_argument("--configs", type=split, default=[],
                 help="strategy-parametrization-fidelity triples instead of the product, "
                      "e.g. CMA_ES-box-full,optuna_cmaes-box-adaptive")
  p.add_argument("--dev_sizes", type=lambda s: [int(x) for x in split(s)], default=[])
  p.add_argument("--num_seeds", type=int, default=3)
  p.add_argument("--budget", type=int, default=48)
  p.add_argument("--max_examples", type=int, default=None)
  # 0.15 + 2 of 12 promoted: under a third of the full search's dev evaluations.
  p.add_argument("--subset", type=float, default=0.15)
  p.add_argument("--promote", type=float, default=1 / 6)
  p.add_argument("--bindings", action="append", default=[],
                 help="a gin binding for every run (e.g. 'SearchConfig.warm_start = False')")
  p.add_argument("--tag", default="", help="appended to every run's name (with --bindings)")
  p.add_argument("--summary_only", action="store_true")
  p.add_argument("--reference", default="CMA_ES-relu_normalize-full",
                 help="the configuration the pooled table pairs every other one with, and "
                      "whose seeded tables (every baseline) the summary prints")
  args = p.parse_args()
  from recycle_jax.search import strategies
  from recycle_jax.merging import spaces
  if args.configs:
    if any(len(c.split("-")) != 3 for c in args.configs):
      print(f"error: --configs {args.configs} (research_claims); pass "
            "strategy-parametrization-fidelity triples", file=sys.stderr)
      return 2
    args.strategies, args.parametrizations, args.fidelities = (
        list(dict.fromkeys(x)) for x in zip(*[c.split("-") for c in args.configs]))
  bad = ([f"--strategies {s}" for s in args.strategies if s not in strategies.REGISTRY] +
         [f"--parametrizations {s}" for s in args.parametrizations
          if s not in spaces.REGISTRY] +
         [f"--fidelities {s}" for s in args.fidelities if s not in ("full", "adaptive")])
  if bad or args.num_seeds < 1:
    print(f"error: unknown {bad[0] if bad else f'--num_seeds={args.num_seeds}'} "
          "(research_claims); see --help for the choices", file=sys.stderr)
    return 2
  runs = grid(args)
  jobs = [] if args.summary_only else [
      (r["setting"], os.path.join(args.workdir, r["name"]), bindings(r, args), flags(r, args))
      for r in runs if not runner.done(os.path.join(args.workdir, r["name"]), args.num_seeds)]
  text = lambda w: summary(w, runs, args)
  return runner.run_all(jobs, args.pool, args.workdir, text, "claims.md")


if __name__ == "__main__":
  sys.exit(main())
