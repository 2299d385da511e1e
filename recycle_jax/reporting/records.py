"""results.json and report.md: the paper's Table 1 for one run, the hypervolumes, the mean
and 95% CI over repeated seeds, and links to the figures.

A run's result is a `RunResult` of `MethodResult`s (built by `experiment`);
`build_results` turns it into results.json's record, in this one place, and `write_run`
writes it with its figures and report.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from recycle_jax.search import baselines, pareto
from recycle_jax.reporting import metrics
from recycle_jax.runtime import backend
from recycle_jax.runtime.outputs import write_text as atomic_write_text
from recycle_jax.reporting.statistics import mean_ci, tradeoff_summary



def _task_dict(names: Sequence[str], values) -> dict[str, float]:
  return {t: (None if not np.isfinite(v) else round(float(v), 4)) for t, v in zip(names, values)}


def _fitness(values) -> float | None:
  v = float(np.mean(values)) if len(values) else float("nan")
  return round(v, 4) if np.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method's merge: per-checkpoint weights alphas [N], dev scores [T], test scores
  [T + R] (held-in, then held-out tasks), and how it was merged when not by its weights
  alone (`MergeSpace.describe`, a soup's ingredients)."""
  alphas: np.ndarray
  dev: np.ndarray
  test: np.ndarray
  merge: dict | None = None


@dataclasses.dataclass(frozen=True)
class RunResult:
  """One search run: the pool's scores, every method's result, the search's archive and
  its sweep (pareto.Sweep records), with the test scores of the merges on the dev fronts
  (`pareto.test_needed`'s points, in its order)."""
  tasks: Sequence[str]
  report_tasks: Sequence[str]
  pool_names: Sequence[str]
  single_dev: np.ndarray  # [N, T]
  single_test: np.ndarray  # [N, T + R]
  methods: dict[str, MethodResult]
  archive: Any  # search.Archive
  config: dict
  space: Any = None  # the searched spaces.MergeSpace; None: linear weights
  sweeps: Sequence[Any] = ()  # pareto.Sweep, one per sweep search
  front_test: np.ndarray | None = None  # [K, T + R]; None: no Pareto record
  reference: float = 0.0  # the hypervolume reference score on every task


def _method_record(m: MethodResult, tasks, test_names) -> dict:
  out = {"weights": [round(float(a), 6) for a in m.alphas],
         "scores": {"dev": _task_dict(tasks, m.dev), "test": _task_dict(test_names, m.test)},
         "fitness": {"dev": _fitness(m.dev), "test": _fitness(m.test[:len(tasks)])}}
  if m.merge is not None:
    out["merge"] = m.merge
  return out


def _oracle_record(run: RunResult) -> dict:
  """The oracle row: each task scored by its own dev-best checkpoint."""
  t = len(run.tasks)
  best = np.argmax(np.nan_to_num(run.single_dev, nan=-np.inf), axis=0)
  dev, test = run.single_dev[best, np.arange(t)], run.single_test[best, np.arange(t)]
  return {"weights": None,
          "checkpoints": {task: run.pool_names[i] for task, i in zip(run.tasks, best)},
          "scores": {"dev": _task_dict(run.tasks, dev), "test": _task_dict(run.tasks, test)},
          "fitness": {"dev": _fitness(dev), "test": _fitness(test)}}


def _history(run: RunResult) -> list[dict]:
  """Every archived merge; where the space's points are not per-checkpoint weights, those
  too (`checkpoint_weights`: what the figures draw)."""
  a = run.archive.arrays()
  apart = run.space is not None and not run.space.is_linear
  out = []
  for i in range(len(run.archive)):
    h = {"weights": [round(float(v), 6) for v in a["points"][i]],
         "fitness": None if not np.isfinite(a["fitness"][i]) else round(float(a["fitness"][i]), 4),
         "scores": _task_dict(run.tasks, a["scores"][i]),
         "kind": "seed" if a["is_seed"][i] else "search",
         "fidelity": round(float(a["fidelity"][i]), 4),
         "dev_examples": int(a["examples"][i])}
    if apart:
      h["checkpoint_weights"] = np.round(run.space.checkpoint_weights(a["points"][i]),
                                         6).tolist()
    out.append(h)
  return out


def build_results(run: RunResult) -> dict:
  """results.json's record of a run (its figures are added when they are drawn)."""
  test_names = list(run.tasks) + list(run.report_tasks)
  out = {"tasks": list(run.tasks), "report_tasks": list(run.report_tasks),
         "config": run.config,
         "pool": [{"name": n, "scores": {"dev": _task_dict(run.tasks, run.single_dev[i]),
                                         "test": _task_dict(test_names, run.single_test[i])}}
                  for i, n in enumerate(run.pool_names)],
         "methods": {name: _method_record(m, run.tasks, test_names)
                     for name, m in run.methods.items()},
         "history": _history(run)}
  out["methods"]["best_per_task"] = _oracle_record(run)
  if run.front_test is not None:
    out["pareto"] = pareto.front_record(out, run.archive, run.sweeps, run.space,
                                        run.front_test, run.single_dev, run.single_test,
                                        run.reference)
  return out


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.1f}"


def table1(results: dict) -> str:
  """Markdown: per method, dev and test score per task and their averages."""
  tasks, extra = results["tasks"], results.get("report_tasks", [])
  head = ["method"] + [f"{t} dev" for t in tasks] + ["avg dev"] + \
         [f"{t} test" for t in tasks] + ["avg test"] + [f"{t} test (held-out)" for t in extra]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in _ordered(results["methods"]):
    m = results["methods"][name]
    row = [name] + [_fmt(m["scores"]["dev"].get(t)) for t in tasks] + [_fmt(m["fitness"]["dev"])]
    row += [_fmt(m["scores"]["test"].get(t)) for t in tasks] + [_fmt(m["fitness"]["test"])]
    row += [_fmt(m["scores"]["test"].get(t)) for t in extra]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def pool_table(results: dict) -> str:
  tasks = results["tasks"] + results.get("report_tasks", [])
  lines = ["| checkpoint | " + " | ".join(f"{t} test" for t in tasks) + " |",
           "|" + "---|" * (len(tasks) + 1)]
  for p in results["pool"]:
    lines.append(f"| {p['name']} | " + " | ".join(_fmt(p["scores"]["test"].get(t))
                                                  for t in tasks) + " |")
  return "\n".join(lines)


def weights_line(weights, names) -> str:
  return ", ".join(f"{n}={w:.3f}" for n, w in zip(names, weights) if w > 1e-6)


def _ordered(names) -> list[str]:
  order = baselines.report_order()
  return [m for m in order if m in names] + [m for m in names if m not in order]


def report_markdown(results: dict) -> str:
  names = [p["name"] for p in results["pool"]]
  search = results["methods"]["search"]
  hist = [h for h in results["history"] if h["kind"] == "search"]
  nonzero = sum(w > 1e-6 for w in search["weights"])
  parts = [
      "# recycle_jax search report", "",
      f"Tasks searched (dev fitness = macro-average): {', '.join(results['tasks'])}.",
      f"Held-out tasks (reported, never searched): {', '.join(results.get('report_tasks', [])) or 'none'}.",
      f"Pool: {len(names)} checkpoints; {len(hist)} merges evaluated by the search.", "",
      "## Table 1: methods on dev and test", "", table1(results), "",
      f"Search weights ({nonzero} of {len(names)} non-zero): "
      f"{weights_line(search['weights'], names)}", ""]
  if search.get("merge", {}).get("merge_space", "linear") != "linear":
    parts += [f"Searched merge space: `{search['merge']['merge_space']}`, hyperparameters "
              f"{search['merge']['hparams']} (weights above averaged over layer groups).", ""]
  if "seeds" in results:
    parts += [seeds_markdown(results), ""]
  if results.get("pareto"):
    parts += [pareto.pareto_markdown(results), ""]
  parts += ["## The pool on test", "", pool_table(results), ""]
  if results.get("figures"):
    parts += ["## Figures", ""] + [f"![{os.path.splitext(os.path.basename(f))[0]}]({f})"
                                   for f in results["figures"]] + [""]
  return "\n".join(parts)


def write_report(workdir: str, results: dict) -> str:
  path = os.path.join(workdir, "report.md")
  atomic_write_text(path, report_markdown(results))
  return path


def write_run(workdir: str, results: dict, runs: Sequence[dict] = ()) -> None:
  """Figures (a convenience: a failure is logged, never fatal; `runs`: the seeds' results,
  for their curves), results.json, report.md and TensorBoard scalars (workdir/tb)."""
  try:
    from recycle_jax.reporting import figures  # matplotlib: only when a run is written
    results["figures"] = figures.write_run_figures(workdir, results, runs)
  except Exception as e:  # noqa: BLE001
    logging.warning("figures not drawn: %s: %s", type(e).__name__, e)
  results["runtime"] = backend.describe()  # the hardware and jax that produced it
  atomic_write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=1))
  write_report(workdir, results)
  try:
    metrics.write_history(workdir, results)
  except ImportError as e:  # the JSON is the record; TensorBoard files are a convenience
    logging.warning("no TensorBoard scalars written (%s)", e)


def _stat(values) -> dict:
  m, h, n = mean_ci(values)
  r = lambda x: None if not np.isfinite(x) else round(x, 4)
  return {"mean": r(m), "ci95": r(h), "n": n}


def seed_summary(runs: Sequence[dict]) -> dict:
  """Mean and 95% CI over runs (seeds) of every method's scores per task and fitness, and
  of every hypervolume; methods absent from a run are left out."""
  common = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
  out = {"num_seeds": len(runs), "methods": {}, "hypervolume": {}}
  for m in common:
    rows = [r["methods"][m] for r in runs]
    out["methods"][m] = {
        split: {t: _stat([x["scores"][split].get(t) for x in rows])
                for t in rows[0]["scores"][split]} for split in ("dev", "test")}
    out["methods"][m]["fitness"] = {split: _stat([x["fitness"][split] for x in rows])
                                    for split in ("dev", "test")}
  for split in ("dev", "test"):
    hvs = [r.get("pareto", {}).get("hypervolume", {}).get(split, {}) for r in runs]
    for k in [k for k in hvs[0] if all(k in h for h in hvs)]:
      out["hypervolume"].setdefault(split, {})[k] = _stat([h[k] for h in hvs])
  return out


def with_seeds(first: dict, runs: Sequence[dict], dirs: Sequence[str]) -> dict:
  """The first run's results plus `seeds`: the summary over all runs and their subdirs."""
  out = json.loads(json.dumps(first))  # a deep copy; the per-seed record stays as written
  out["seeds"] = {**seed_summary(runs), "runs": list(dirs)}
  return out


def _pm(stat: dict) -> str:
  if stat["mean"] is None:
    return "–"
  return f"{stat['mean']:.1f}" + ("" if stat["ci95"] is None else f" ± {stat['ci95']:.1f}")


def seeds_markdown(results: dict) -> str:
  """Mean ± 95% CI (t-distribution) over seeds, per method and task, on test and dev."""
  s = results["seeds"]
  tasks = results["tasks"] + results.get("report_tasks", [])
  head = ["method"] + [f"{t} test" for t in tasks] + ["avg test", "avg dev"]
  lines = [f"## Repeated seeds: mean ± 95% CI over {s['num_seeds']} seeds "
           f"({', '.join(s['runs'])})", "",
           "Baselines do not depend on the search seed, so their interval is 0.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in _ordered(s["methods"]):
    m = s["methods"][name]
    cells = [_pm(m["test"][t]) if t in m["test"] else "–" for t in tasks]
    lines.append(f"| {name} | " + " | ".join(cells + [_pm(m["fitness"]["test"]),
                                                     _pm(m["fitness"]["dev"])]) + " |")
  if s.get("hypervolume"):
    lines += ["", "Hypervolume (mean ± 95% CI): " + "; ".join(
        f"{split} {k} {v['mean']:.4f} ± {v['ci95'] or 0:.4f}"
        for split, hv in s["hypervolume"].items() for k, v in hv.items()
        if k in ("search", "all") and v["mean"] is not None)]
  return "\n".join(lines)


def pool_report_markdown(names, tasks, held_out, dev, test, recipes=None, timing=None) -> str:
  """Table 2 (per-checkpoint scores), the Spearman matrix (Fig. 4) and tradeoff checks.

  dev/test: [N, T + H] score arrays over tasks + held_out.
  """
  cols = list(tasks) + list(held_out)
  t = len(tasks)
  lines = ["# Pool report", ""]
  if timing:
    lines += [f"Built in {timing.get('total_seconds', '?')} s "
              f"(training {timing.get('train_seconds', '?')} s)."]
    env = timing.get("built_on")
    if env:
      lines += ["", f"Built on {env.get('cpu')} ({env.get('vector_isa') or '?'}, "
                f"{env.get('cores')} cores), jax {env.get('jax')}, "
                f"{env.get('devices')} {env.get('backend')} devices. The same config and seed "
                "on another CPU model trains a different pool: XLA's float reductions "
                "depend on the processor and the thread count."]
    lines += [""]
  lines += ["## Table 2: checkpoints on test (dev in parentheses)", "",
            "| checkpoint | " + " | ".join(cols) + " | held-in avg |",
            "|" + "---|" * (len(cols) + 2)]
  for k, n in enumerate(names):
    cells = [f"{test[k, j]:.1f} ({dev[k, j]:.1f})" for j in range(len(cols))]
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {test[k, :t].mean():.1f} |")
  summ = tradeoff_summary(names, tasks, test[:, :t])
  rho = summ["spearman"]
  lines += ["", "## Spearman correlation of held-in test scores across checkpoints", "",
            "| | " + " | ".join(tasks) + " |", "|" + "---|" * (t + 1)]
  for i, a in enumerate(tasks):
    lines.append(f"| {a} | " + " | ".join(f"{rho[i, j]:+.2f}" for j in range(t)) + " |")
  neg = summ["most_negative"]
  ok_neg = neg is not None and neg[0] <= -0.3
  ok_best = not summ["best_on_every_task"]
  lines += ["", "## Tradeoff checks", "",
            f"- most negative held-in pair: {neg[1]} vs {neg[2]}, rho = {neg[0]:+.2f} "
            f"({'PASS' if ok_neg else 'FAIL'}: needs <= -0.30)" if neg else "- no pairs",
            f"- checkpoints best on every held-in task: "
            f"{', '.join(summ['best_on_every_task']) or 'none'} ({'PASS' if ok_best else 'FAIL'})"]
  if recipes:
    lines += ["", "## Recipes", ""]
    for n, r in zip(names, recipes):
      stages = "; ".join(
          f"{s.get('objective', 'sft')} on {'+'.join(s['mix'])} x{s['steps']} lr={s['lr']}"
          for s in r["stages"])
      lines.append(f"- **{n}**: {stages}")
  return "\n".join(lines) + "\n"
