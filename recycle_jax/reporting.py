"""results.json and report.md: the paper's Table 1 for one run."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from recycle_jax.checkpoints import atomic_write_text

METHOD_ORDER = ("best_single", "best_per_task", "uniform", "merge_best", "search")


def _task_dict(names: Sequence[str], values) -> dict[str, float]:
  return {t: (None if not np.isfinite(v) else round(float(v), 4)) for t, v in zip(names, values)}


def _fitness(values) -> float | None:
  v = float(np.mean(values)) if len(values) else float("nan")
  return round(v, 4) if np.isfinite(v) else None


def build_results(tasks, report_tasks, pool_names, single_dev, single_test, methods,
                  archive, config) -> dict:
  """methods: {name: (alphas [N], dev scores [T], test scores [T + R])}."""
  test_names = list(tasks) + list(report_tasks)
  t = len(tasks)
  out = {"tasks": list(tasks), "report_tasks": list(report_tasks), "config": config,
         "pool": [{"name": n, "scores": {"dev": _task_dict(tasks, single_dev[i]),
                                         "test": _task_dict(test_names, single_test[i])}}
                  for i, n in enumerate(pool_names)],
         "methods": {}, "history": []}
  for name, (alphas, dev, test) in methods.items():
    out["methods"][name] = {
        "weights": [round(float(a), 6) for a in alphas],
        "scores": {"dev": _task_dict(tasks, dev), "test": _task_dict(test_names, test)},
        "fitness": {"dev": _fitness(dev), "test": _fitness(test[:t])}}
  # The oracle row: each task scored by its own dev-best checkpoint.
  best = np.argmax(np.nan_to_num(single_dev, nan=-np.inf), axis=0)
  dev = single_dev[best, np.arange(t)]
  test = single_test[best, np.arange(t)]
  out["methods"]["best_per_task"] = {
      "weights": None, "checkpoints": {task: pool_names[i] for task, i in zip(tasks, best)},
      "scores": {"dev": _task_dict(tasks, dev), "test": _task_dict(tasks, test)},
      "fitness": {"dev": _fitness(dev), "test": _fitness(test)}}
  arrays = archive.arrays()
  for i in range(len(archive)):
    out["history"].append({"weights": [round(float(a), 6) for a in arrays["alphas"][i]],
                           "fitness": None if not np.isfinite(arrays["fitness"][i])
                           else round(float(arrays["fitness"][i]), 4),
                           "scores": _task_dict(tasks, arrays["scores"][i]),
                           "kind": "seed" if arrays["is_seed"][i] else "search"})
  return out


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.1f}"


def table1(results: dict) -> str:
  """Markdown: per method, dev and test score per task and their averages."""
  tasks, extra = results["tasks"], results.get("report_tasks", [])
  head = ["method"] + [f"{t} dev" for t in tasks] + ["avg dev"] + \
         [f"{t} test" for t in tasks] + ["avg test"] + [f"{t} test (held-out)" for t in extra]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in [m for m in METHOD_ORDER if m in results["methods"]] + \
              [m for m in results["methods"] if m not in METHOD_ORDER]:
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
      f"{weights_line(search['weights'], names)}", "",
      "## The pool on test", "", pool_table(results), ""]
  return "\n".join(parts)


def write_run(workdir: str, results: dict) -> None:
  atomic_write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=1))
  atomic_write_text(os.path.join(workdir, "report.md"), report_markdown(results))
