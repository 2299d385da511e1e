"""The paper's figures as PNG files (matplotlib, Agg backend), from results.json alone.

  pareto_scatter   Fig. 3: two tasks' dev scores: checkpoints with a fit line, baselines,
                   every evaluated merge and the Pareto front
  weights_heatmap  Fig. 6: the top-5 weight vectors the search found
  fitness_curve    Fig. 9: fitness against evaluations (best so far; mean and 95% CI over
                   repeated seeds)
  spearman_heatmap Fig. 4: Spearman correlation of task scores across checkpoints
  top_n_ablation   test fitness against pool size, from several results.json

`write_run_figures` draws a run's figures into workdir/figures and returns their paths
relative to workdir, for report.md to link.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recycle_jax.search import baselines, pareto  # noqa: E402

FIG_DIR = "figures"
BASELINE_STYLE = baselines.markers()  # row -> marker; its order gives the colours


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _scores(d: dict, tasks: Sequence[str]) -> np.ndarray:
  return np.asarray([np.nan if d.get(t) is None else d[t] for t in tasks], np.float64)


def _history(results: dict, kind: str | None = "search") -> list[dict]:
  return [h for h in results["history"] if kind is None or h["kind"] == kind]


def checkpoint_weights(h: dict) -> np.ndarray:
  """A history entry's per-checkpoint weights, as its record gives them (its point itself
  when the space is linear)."""
  return np.asarray(h.get("checkpoint_weights", h["weights"]), np.float64)


def coincident(points: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
  """Methods that land on the same point, drawn once: [(style key, label, point)], the
  label naming all of them ("best_single = greedy_soup"), so none hides under another."""
  groups: dict[tuple, list[str]] = {}
  for name, v in points.items():
    groups.setdefault(tuple(np.round(np.atleast_1d(v), 6)), []).append(name)
  return [(names[0], " = ".join(names), points[names[0]]) for names in groups.values()]


# ----------------------------------------------------------------------------- figures

def pareto_scatter(results: dict, path: str, tasks: Sequence[str] | None = None) -> str:
  """Fig. 3 on dev scores of two tasks (the first two searched unless given)."""
  tasks = list(tasks or results["tasks"][:2])
  fig, ax = plt.subplots(figsize=(8, 5))
  pts = np.asarray([_scores(h["scores"], tasks) for h in _history(results)]).reshape(-1, 2)
  extra = np.asarray([[np.nan if v is None else v for v in row]
                      for row in results.get("pareto", {}).get("evaluated", [])], np.float64)
  cols = [results["tasks"].index(t) for t in tasks]
  extra = extra[:, cols] if extra.size else np.zeros((0, 2))
  allpts = np.concatenate([pts, extra])
  ax.scatter(allpts[:, 0], allpts[:, 1], s=10, c="0.7", label="evaluated merges", zorder=1)
  front = allpts[pareto.front_indices(allpts)] if len(allpts) else allpts
  if len(front):
    ax.step(front[:, 0], front[:, 1], where="post", c="tab:red", lw=1.5, zorder=2)
    ax.scatter(front[:, 0], front[:, 1], s=22, c="tab:red", label="Pareto front", zorder=3)
  ck = np.asarray([_scores(p["scores"]["dev"], tasks) for p in results["pool"]])
  ax.scatter(ck[:, 0], ck[:, 1], s=40, c="tab:blue", marker="o", label="checkpoints", zorder=4)
  for p, (x, y) in zip(results["pool"], ck):
    ax.annotate(p["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ok = np.all(np.isfinite(ck), -1)
  if ok.sum() >= 2 and np.ptp(ck[ok, 0]) > 0:
    slope, icept = np.polyfit(ck[ok, 0], ck[ok, 1], 1)
    xs = np.linspace(ck[ok, 0].min(), ck[ok, 0].max(), 2)
    ax.plot(xs, slope * xs + icept, "--", c="tab:blue", lw=1, label=f"fit (slope {slope:+.2f})")
  points = {name: _scores(m["scores"]["dev"], tasks) for name, m in results["methods"].items()
            if name != "best_per_task"}
  for name, label, s in coincident({k: v for k, v in points.items() if np.all(np.isfinite(v))}):
    ax.scatter(*s, s=90 if name == "search" else 55, marker=BASELINE_STYLE.get(name, "o"),
               edgecolors="k", label=label, zorder=5)
  ax.set_xlabel(f"{tasks[0]} (dev)")
  ax.set_ylabel(f"{tasks[1]} (dev)")
  ax.set_title("Merges and checkpoints on two tasks")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # never over the data
  return _save(fig, path)


def weights_heatmap(results: dict, path: str, top: int = 5) -> str:
  """Fig. 6: the `top` best distinct search merges' per-checkpoint weights."""
  hist = sorted((h for h in _history(results) if h["fitness"] is not None),
                key=lambda h: -h["fitness"])
  rows, seen = [], set()
  for h in hist:
    w = checkpoint_weights(h)
    key = tuple(np.round(w, 3))
    if key not in seen:
      seen.add(key)
      rows.append((h["fitness"], w))
    if len(rows) == top:
      break
  names = [p["name"] for p in results["pool"]]
  grid = np.asarray([w for _, w in rows]).reshape(-1, len(names))
  fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 0.5 * len(rows) + 1.5))
  im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1e-6, grid.max(initial=0)),
                 aspect="auto")
  for (i, j), v in np.ndenumerate(grid):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
            color="w" if v < 0.6 * grid.max() else "k")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(rows)), [f"#{i + 1} ({f:.1f})" for i, (f, _) in enumerate(rows)],
                fontsize=8)
  ax.set_title(f"Top-{len(rows)} merges: weight per checkpoint (dev fitness)")
  fig.colorbar(im, ax=ax, fraction=0.04)
  return _save(fig, path)


def best_so_far(results: dict) -> np.ndarray:
  f = np.asarray([np.nan if h["fitness"] is None else h["fitness"] for h in _history(results)])
  return np.fmax.accumulate(np.where(np.isfinite(f), f, -np.inf)) if len(f) else f


def fitness_curve(runs: Sequence[dict], path: str) -> str:
  """Fig. 9: dev fitness of every search merge (first run) and the best so far; over
  several runs (seeds) the mean best-so-far with its 95% t-interval."""
  from recycle_jax.reporting.statistics import mean_ci
  fig, ax = plt.subplots(figsize=(6, 4))
  first = runs[0]
  f = [h["fitness"] for h in _history(first)]
  ax.scatter(np.arange(1, len(f) + 1), [np.nan if v is None else v for v in f], s=8, c="0.6",
             label="evaluated merge")
  curves = [best_so_far(r) for r in runs]
  length = min(len(c) for c in curves)
  x = np.arange(1, length + 1)
  if len(runs) == 1:
    ax.plot(x, curves[0][:length], c="tab:red", label="best so far")
  else:
    stats = [mean_ci([c[i] for c in curves]) for i in range(length)]
    mean = np.asarray([s[0] for s in stats])
    ci = np.asarray([s[1] for s in stats])
    ax.plot(x, mean, c="tab:red", label=f"best so far (mean of {len(runs)} seeds)")
    ax.fill_between(x, mean - ci, mean + ci, color="tab:red", alpha=0.2, label="95% CI")
  levels = {name: first["methods"][name]["fitness"]["dev"]
            for name in ("uniform", "merge_best", "best_single", "greedy_soup")
            if first["methods"].get(name, {}).get("fitness", {}).get("dev") is not None}
  for name, label, v in coincident(levels):
    ax.axhline(float(v), ls="--", lw=1, c=f"C{list(BASELINE_STYLE).index(name)}", label=label)
  ax.set_xlabel("evaluations")
  ax.set_ylabel("dev fitness")
  ax.set_title("Search progress")
  ax.legend(fontsize=7, loc="lower right")
  return _save(fig, path)


def spearman_heatmap(rho: np.ndarray, tasks: Sequence[str], path: str,
                     title: str = "Spearman correlation across checkpoints") -> str:
  """Fig. 4: [T, T] rank correlations."""
  rho = np.asarray(rho, np.float64)
  fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 2.5, 0.9 * len(tasks) + 1.8))
  im = ax.imshow(rho, cmap="RdBu", vmin=-1, vmax=1)
  for (i, j), v in np.ndenumerate(rho):
    ax.text(j, i, "–" if not np.isfinite(v) else f"{v:+.2f}", ha="center", va="center",
            fontsize=8, color="w" if np.isfinite(v) and abs(v) > 0.5 else "k")
  ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(fig, path)


def top_n_ablation(runs: Sequence[dict | str], path: str, split: str = "test",
                   methods: Sequence[str] = ("search", "uniform", "merge_best",
                                             "best_single")) -> str:
  """Fitness against pool size N, one line per method; runs: results dicts or paths."""
  runs = [json.load(open(r)) if isinstance(r, str) else r for r in runs]
  runs = sorted(runs, key=lambda r: len(r["pool"]))
  x = [len(r["pool"]) for r in runs]
  fig, ax = plt.subplots(figsize=(5, 4))
  for name in methods:
    y = [r["methods"].get(name, {}).get("fitness", {}).get(split) for r in runs]
    y = [np.nan if v is None else v for v in y]
    ax.plot(x, y, marker=BASELINE_STYLE.get(name, "o"), label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(x, [str(v) for v in x])
  ax.set_xlabel("pool size N (top-N checkpoints by dev fitness)")
  ax.set_ylabel(f"{split} fitness")
  ax.set_title("Top-N ablation")
  ax.legend(fontsize=8)
  return _save(fig, path)


# ----------------------------------------------------------------------------- runs

def pool_spearman(results: dict, split: str = "test") -> np.ndarray:
  from recycle_jax.reporting.statistics import spearman_matrix
  tasks = results["tasks"]
  return spearman_matrix(np.asarray([_scores(p["scores"][split], tasks)
                                     for p in results["pool"]]))


def write_run_figures(workdir: str, results: dict, runs: Sequence[dict] = ()) -> list[str]:
  """Draws a run's figures into workdir/figures; returns paths relative to workdir.

  runs: the per-seed results of a repeated-seed run (for the fitness curve's interval).
  """
  out = []
  draw = lambda name, fn, *a: out.append(os.path.relpath(
      fn(*a, os.path.join(workdir, FIG_DIR, name)), workdir))
  if len(results["tasks"]) >= 2:
    draw("pareto.png", pareto_scatter, results)
    draw("spearman.png", lambda p: spearman_heatmap(pool_spearman(results), results["tasks"],
                                                    p, "Spearman (test) across checkpoints"))
  if _history(results):
    draw("weights_top5.png", weights_heatmap, results)
    draw("fitness.png", fitness_curve, list(runs) or [results])
  return out


def pool_figures(workdir: str) -> list[str]:
  """The pool report's Spearman figure (held-in test scores), linked from pool_report.md."""
  from recycle_jax.checkpoint_io import pool_manifest
  from recycle_jax.runtime import outputs
  from recycle_jax.reporting import statistics
  from recycle_jax.tasks import embedded as tasks_
  pool = pool_manifest.read_manifest(os.path.join(workdir, "pool.json"))
  scores = pool.cached_scores("test")
  if not scores:
    return []
  names = [t for t in next(iter(scores.values())) if t not in tasks_.HELD_OUT]
  if len(names) < 2:
    return []
  grid = np.asarray([[scores[e][t] for t in names] for e in pool.names], np.float64)
  path = spearman_heatmap(statistics.spearman_matrix(grid), names,
                          os.path.join(workdir, FIG_DIR, "spearman.png"),
                          "Spearman (held-in test) across checkpoints")
  rel = os.path.relpath(path, workdir)
  report = os.path.join(workdir, "pool_report.md")
  if os.path.exists(report):
    text = open(report).read()
    if rel not in text:
      link = f"\n\n## Figures\n\n![Spearman]({rel})\n"
      outputs.write_text(report, text.rstrip("\n") + link)
  return [rel]


def main(argv: Sequence[str] | None = None) -> int:
  """python -m recycle_jax.reporting.figures --top_n OUT.png RUN/results.json ..."""
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__)
  p.add_argument("--top_n", required=True, help="output PNG of the top-N ablation")
  p.add_argument("results", nargs="+")
  args = p.parse_args(argv)
  print(top_n_ablation(args.results, args.top_n))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())


def training_run(steps: Sequence[int], per_step: dict[str, Sequence[float]],
                 merges: dict[str, dict[str, float]], path: str) -> str:
  """A training run as a pool: per panel ('held-in', 'held-out'), every step's own test
  score along the run, and each merge (or other run) as a horizontal line."""
  fig, axes = plt.subplots(1, len(per_step), figsize=(5.2 * len(per_step), 3.8))
  for ax, (panel, ys) in zip(np.atleast_1d(axes), per_step.items()):
    ax.plot(steps, ys, "o-", c="tab:blue", label="each step alone")
    for i, (name, v) in enumerate(merges.items()):
      ax.axhline(v[panel], ls="--" if name != "search" else "-", lw=1.5 if name == "search"
                 else 1, c=f"C{(i + 1) % 10}", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{panel} test score (macro-average)")
    ax.set_title(panel)
  np.atleast_1d(axes)[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  return _save(fig, path)
