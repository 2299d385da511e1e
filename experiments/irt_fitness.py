"""IRT fitness against the full search, successive halving and a random subset of the
same size, paired by seed: dev examples evaluated (a fraction of the full search's) and
the test fitness of the returned merge.

  python experiments/irt_fitness.py --workdir=runs/research_irt \
      --settings=experiments/settings/reasoning.gin --num_seeds=5 --budget=48 \
      --dev_size=512 --items=24

Every configuration of a setting runs the same seeds on the same pool with warm start and
no greedy soup, in one process (the pool, single checkpoints and linear baselines scored
once); the summary (W/irt.md) has one row per (setting, configuration).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)
from recycle_jax.reporting import statistics  # noqa: E402

CONFIGS = ("full", "adaptive", "irt", "random")


def name(setting: str) -> str:
  """A setting's name: a gin file's base name, or the setting itself."""
  return os.path.basename(setting).removesuffix(".gin")


OVERRIDES = {"full": {}, "adaptive": {"fidelity_subset": 0.15, "fidelity_promote": 1 / 6},
             "irt": {"irt_select": "fisher"}, "random": {"irt_select": "random"}}


def run(setting: str, args) -> None:
  """Every configuration and seed of a setting in one process: the pool loaded, the single
  checkpoints and the linear baselines scored once, then each (configuration, seed)
  search written to W/<setting>/<configuration>/seed_<k> (`experiment.search_once`)."""
  import dataclasses
  from recycle_jax import cli, configurables, experiment
  from recycle_jax.checkpoint_io import pool_manifest
  cli._register_tasks(args.dev_size)
  cli._parse_gin([setting], [f"Experiment.pool = '{args.pool}'",
                             "Experiment.save_merged = False", "Experiment.greedy_soup = False",
                             f"SearchConfig.budget = {args.budget}",
                             "SearchConfig.warm_start = True"])
  exp = experiment.configured_experiment()
  pool = pool_manifest.load_pool(exp.pool)
  base = configurables.SearchConfig()
  wd = os.path.join(args.workdir, name(setting))
  inputs = experiment.check_inputs(exp, base, wd, False, True, args.num_seeds, pool)
  run_ = experiment.place(exp, inputs)
  experiment.score_singles(run_, base.pop_size(run_.n))
  space = configurables.make_space(base.merge_space, run_.loaded.params[0], run_.n)
  scorer = run_.programs.scorer(space, base.pop_size(space.dim))
  run_.single_test = run_.scorer(np.eye(run_.n, dtype=np.float32), run_.test, "test")
  experiment.score_baselines(run_, {})
  sweep = dataclasses.replace(configurables.SweepConfig(), num_weights=0)
  # seed by seed: a run cut short has as many seeds of every arm
  for k in args.seeds or range(args.num_seeds):
    for c in args.configs:
      extra = dict(OVERRIDES[c])
      if c in ("irt", "random"):
        extra.update(irt_items=args.items, irt_promote_every=args.promote_every)
      out = os.path.join(wd, c, f"seed_{k}")
      if os.path.isfile(os.path.join(out, "results.json")):
        continue
      cfg = dataclasses.replace(base, seed=base.seed + k, **extra)
      # a search cut short (the process killed) goes on from its last saved generation
      resume = os.path.isdir(os.path.join(out, "search_state"))
      experiment.search_once(run_, cfg, space, scorer, out, resume, False, sweep)
      print(f"{name(setting)} {c} seed {k} done", flush=True)


def seed_results(run_dir: str) -> dict[int, dict]:
  """{seed index: results.json} of the finished searches of one configuration."""
  out = {}
  for d in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
    path = os.path.join(run_dir, d, "results.json")
    if d.startswith("seed_") and os.path.isfile(path):
      out[int(d[len("seed_"):])] = json.load(open(path))
  return dict(sorted(out.items()))


def left_seeds(r: dict) -> bool:
  """Whether the returned merge is none of the seeds (single checkpoints, baselines)."""
  seeds = [h["weights"] for h in r["history"] if h["kind"] == "seed"]
  w = np.asarray(r["methods"]["search"]["weights"])
  return not any(np.allclose(w, s, atol=1e-6) for s in seeds)


def summary(workdir: str, args) -> str:
  lines = ["| setting | configuration | seeds | dev examples (fraction of full) "
           "| dev fitness (mean ± 95% CI) | test fitness (mean ± 95% CI) "
           "| returned a non-seed merge | same merge as full "
           "| dev - full search (paired, mean ± sd) "
           "| test - full search (paired, mean ± sd) | its 95% CI | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for setting in args.settings:
    res = {c: seed_results(os.path.join(workdir, name(setting), c)) for c in CONFIGS}
    full = res["full"]
    any_run = next((r for rs in res.values() for r in rs.values()), None)
    if any_run is None:
      continue
    # The full search scores every candidate on every dev example: budget x sum E.
    full_ex = any_run["config"]["search"]["budget"] * sum(
        any_run["config"]["dev_examples"].values())
    get = lambda r, k: r["methods"]["search"][k]  # noqa: E731
    for c in CONFIGS:
      rs = res[c]
      if not rs:
        continue
      ex = np.mean([r["config"]["dev_examples_evaluated"] for r in rs.values()])
      row = (f"| {name(setting)} | {c} | {len(rs)} | {ex:.0f} ({ex / full_ex:.3f}) | "
             f"{statistics.fmt_ci([get(r, 'fitness')['dev'] for r in rs.values()])} | "
             f"{statistics.fmt_ci([get(r, 'fitness')['test'] for r in rs.values()])} | "
             f"{sum(map(left_seeds, rs.values()))}/{len(rs)} | ")
      both = [k for k in rs if k in full]  # paired by seed
      if c == "full" or not both:
        lines.append(row + "– | – | – | – | – |")
        continue
      same = sum(np.allclose(get(rs[k], "weights"), get(full[k], "weights"), atol=1e-6)
                 for k in both)
      diff = {s: [get(rs[k], "fitness")[s] - get(full[k], "fitness")[s] for k in both]
              for s in ("dev", "test")}
      mean_sd = lambda d: f"{np.mean(d):+.2f}" + (  # noqa: E731
          f" ± {np.std(d, ddof=1):.2f}" if len(d) > 1 else "")
      p = statistics.paired([get(rs[k], "fitness")["test"] for k in both],
                            [get(full[k], "fitness")["test"] for k in both])
      lines.append(row + f"{same}/{len(both)} | {mean_sd(diff['dev'])} | "
                   f"{mean_sd(diff['test'])} | "
                   + (f"± {p['ci95']:.2f}" if len(both) > 1 else "–") + f" | {p['verdict']} |")
  return "\n".join(lines) + "\n"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
  p.add_argument("--workdir", required=True)
  p.add_argument("--pool", default="runs/pool/pool.json")
  p.add_argument("--settings", type=split,
                 default=[os.path.join(os.path.dirname(__file__), "settings", "reasoning.gin")])
  p.add_argument("--configs", type=split, default=list(CONFIGS))
  p.add_argument("--num_seeds", type=int, default=5)
  p.add_argument("--seeds", type=lambda s: [int(k) for k in split(s)], default=None,
                 help="only these seed indices (e.g. 3,4: a second process beside a first)")
  p.add_argument("--budget", type=int, default=48)
  p.add_argument("--dev_size", type=int, default=512)
  p.add_argument("--items", type=int, default=24, help="IRT items per dev task")
  p.add_argument("--promote_every", type=int, default=2)
  p.add_argument("--summary_only", action="store_true", help="the table of what has run")
  args = p.parse_args()
  bad = [c for c in args.configs if c not in CONFIGS]
  if bad:
    print(f"error: unknown --configs {bad[0]} (irt_fitness); choose from {', '.join(CONFIGS)}",
          file=sys.stderr)
    return 2
  for s in [] if args.summary_only else args.settings:
    run(s, args)
  runner.write_summary(args.workdir, summary(args.workdir, args), "irt.md")
  return 0

if __name__ == "__main__":
  sys.exit(main())
