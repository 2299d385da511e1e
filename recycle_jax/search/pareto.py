"""Multi-objective view of merging: scalarizations, Pareto fronts and hypervolume.

Scores are percentages, maximized. A search optimizes one scalarization of its [T] dev
scores: the macro-average (the paper), a weighted sum, or an augmented Chebyshev distance
to the utopia point. The tradeoff weights and the kind are runtime values, so every search
of a sweep runs the same compiled generation. The front is traced by sweeping them; each
method's hypervolume is measured against a fixed reference point (0 on every task) and
reported as a fraction of the box [reference, 100]^T.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from recycle_jax.runtime.errors import check

UTOPIA = 100.0  # the best score on every task
CHEBYSHEV_RHO = 0.01  # augmentation: breaks ties among weakly Pareto-optimal points
SCALARIZATIONS = ("mean", "weighted", "chebyshev")


# ----------------------------------------------------------------------------- scalarizing

def scalarize(scores, weights=None, chebyshev=0.0):
  """[..., T] scores -> [...] fitness (maximized); jittable, NaN stays NaN.

  weights: [T] tradeoff weights (normalized here), None for uniform.
  chebyshev: 0 for the weighted sum, 1 for -max_t w_t (UTOPIA - s_t) + rho * weighted sum.
  With weights None and chebyshev 0 this is the paper's macro-average.
  """
  scores = jnp.asarray(scores, jnp.float32)
  if weights is None:
    w = jnp.full(scores.shape[-1], 1.0 / scores.shape[-1])
  else:
    w = jnp.asarray(weights, jnp.float32)
    w = w / jnp.sum(w)
  weighted = jnp.mean(scores, -1) if weights is None else jnp.sum(scores * w, -1)
  cheb = -jnp.max(w * (UTOPIA - scores), -1) + CHEBYSHEV_RHO * weighted
  return jnp.where(jnp.asarray(chebyshev) > 0, cheb, weighted)


def scalarization_args(kind: str, weights: Sequence[float] | None, num_tasks: int | None = None
                       ) -> tuple[np.ndarray | None, np.float32]:
  """(weights or None, chebyshev flag) for `scalarize`, checked."""
  check(kind in SCALARIZATIONS, f"unknown scalarization {kind!r}",
        "SearchConfig.scalarization", f"choose from {list(SCALARIZATIONS)}")
  if kind == "mean" or weights is None:
    check(kind != "weighted" or weights is not None, "a weighted scalarization needs weights",
          "SearchConfig.task_weights", "give one weight per searched task")
    return None, np.float32(kind == "chebyshev")
  w = np.asarray(weights, np.float32)
  check(num_tasks is None or w.shape == (num_tasks,),
        f"{w.size} task weights for {num_tasks} tasks", "SearchConfig.task_weights",
        "give one weight per searched task")
  check(bool(np.all(w >= 0)) and w.sum() > 0, "task weights must be >= 0, not all zero",
        "SearchConfig.task_weights")
  return w, np.float32(kind == "chebyshev")


def tradeoff_weights(num_tasks: int, k: int, seed: int = 0) -> np.ndarray:
  """k weight vectors [k, T] spread over the simplex: an even grid for two tasks; for more,
  the vertices, the centre, then Dirichlet(1) draws (fixed seed)."""
  if k <= 0:
    return np.zeros((0, num_tasks), np.float32)
  if num_tasks == 2:
    a = np.linspace(0.0, 1.0, k) if k > 1 else np.array([0.5])
    return np.stack([a, 1 - a], -1).astype(np.float32)
  fixed = np.concatenate([np.eye(num_tasks), np.full((1, num_tasks), 1.0 / num_tasks)])
  extra = np.random.default_rng(seed).dirichlet(np.ones(num_tasks), max(0, k - len(fixed)))
  return np.concatenate([fixed, extra])[:k].astype(np.float32)


# ----------------------------------------------------------------------------- fronts

def pareto_mask(points: np.ndarray) -> np.ndarray:
  """[K, T] -> [K] bool: finite rows that no other row dominates (>= everywhere, > once)."""
  p = np.asarray(points, np.float64)
  ok = np.all(np.isfinite(p), -1)
  mask = ok.copy()
  for i in np.flatnonzero(ok):
    others = p[ok]
    dominated = np.any(np.all(others >= p[i], -1) & np.any(others > p[i], -1))
    mask[i] = not dominated
  return mask


def front_indices(points: np.ndarray) -> np.ndarray:
  """Indices of the Pareto front, one per distinct point, sorted by the first task."""
  p = np.asarray(points, np.float64)
  idx = np.flatnonzero(pareto_mask(p))
  _, first = np.unique(p[idx], axis=0, return_index=True)
  idx = idx[np.sort(first)]
  return idx[np.argsort(p[idx, 0], kind="stable")]


def _hv(p: np.ndarray) -> float:
  """Volume dominated by positive points p [K, T] above the origin (slicing on the last
  axis; exact, O(K^T), for the small fronts seen here)."""
  if p.shape[1] == 1:
    return float(p.max())
  p = p[np.argsort(-p[:, -1])]
  vol = 0.0
  for i in range(len(p)):
    lo = p[i + 1, -1] if i + 1 < len(p) else 0.0
    if p[i, -1] > lo:
      vol += (p[i, -1] - lo) * _hv(p[:i + 1, :-1])
  return vol


def hypervolume(points: np.ndarray, reference: Sequence[float] | float = 0.0,
                normalize: bool = True) -> float:
  """Hypervolume of [K, T] points (maximized) against `reference`; NaN rows ignored.

  normalize: divide by the volume of [reference, UTOPIA]^T, so 1 is the utopia point.
  """
  p = np.asarray(points, np.float64).reshape(-1, np.shape(points)[-1])
  ref = np.broadcast_to(np.asarray(reference, np.float64), p.shape[-1])
  p = p[np.all(np.isfinite(p), -1)]
  p = np.minimum(p, UTOPIA)
  p = p[np.all(p > ref, -1)]
  vol = _hv(p[pareto_mask(p)] - ref) if len(p) else 0.0
  return vol / float(np.prod(UTOPIA - ref)) if normalize else vol


# ----------------------------------------------------------------------------- sweeps

@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """Tracing the front: one extra search per (scalarization, tradeoff weights)."""
  num_weights: int = 0  # tradeoff weight vectors per scalarization; 0 = no sweep
  scalarizations: Sequence[str] = ("weighted", "chebyshev")
  budget: int | None = None  # evaluated merges per sweep search; None = SearchConfig.budget
  reference: float = 0.0  # hypervolume reference score on every task


def sweep_configs(scfg, sweep: SweepConfig, num_tasks: int) -> list:
  """The SearchConfigs of a sweep: every scalarization under every tradeoff weight vector."""
  out = []
  for kind in sweep.scalarizations:
    check(kind in SCALARIZATIONS[1:], f"unknown sweep scalarization {kind!r}",
          "SweepConfig.scalarizations", f"choose from {list(SCALARIZATIONS[1:])}")
    for w in tradeoff_weights(num_tasks, sweep.num_weights):
      out.append(dataclasses.replace(
          scfg, scalarization=kind, task_weights=tuple(round(float(v), 4) for v in w),
          budget=sweep.budget or scfg.budget))
  return out


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One search of a sweep: its scalarization, tradeoff weights [T] and archive."""
  scalarization: str
  task_weights: list
  archive: Any  # search.Archive


def evaluated(archive, sweeps: Sequence[Sweep]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(source, point [D], dev scores [T]) of every merge evaluated on the full dev split (an
  adaptive search's subset estimates are left out): the main archive (seeds and search) and
  the sweeps' search merges (their seeds repeat the main ones)."""
  a = archive.arrays()
  full = archive.full()
  sources = ["seed" if s else "search" for s in a["is_seed"][full]]
  points, scores = [a["points"][full]], [a["scores"][full]]
  for rec in sweeps:
    b = rec.archive.arrays()
    keep = ~b["is_seed"] & rec.archive.full()
    sources += [f"{rec.scalarization} {rec.task_weights}"] * int(keep.sum())
    points.append(b["points"][keep])
    scores.append(b["scores"][keep])
  return sources, np.concatenate(points), np.concatenate(scores)


def _fronts(sources: Sequence[str], dev: np.ndarray) -> tuple[np.ndarray, ...]:
  """(overall dev front, the main search's merges, their dev front), as indices."""
  front = front_indices(dev)
  s_idx = np.flatnonzero(np.asarray(sources) == "search")
  s_front = s_idx[front_indices(dev[s_idx])] if len(s_idx) else s_idx
  return front, s_idx, s_front


def test_needed(archive, sweeps: Sequence[Sweep]) -> np.ndarray:
  """Points [K, D] of the merges on the dev fronts: those `front_record` needs test scores
  of (scored there by the caller, so no merge is chosen on test)."""
  sources, points, dev = evaluated(archive, sweeps)
  front, _, s_front = _fronts(sources, dev)
  return points[np.union1d(front, s_front).astype(int)]


# ----------------------------------------------------------------------------- reporting

def point_hypervolumes(methods: dict, tasks: Sequence[str], split: str,
                       reference: float = 0.0) -> dict[str, float]:
  """Hypervolume of each method's single point (results['methods'] entries)."""
  out = {}
  for name, m in methods.items():
    s = [m["scores"][split].get(t) for t in tasks]
    if all(v is not None for v in s):
      out[name] = round(hypervolume(np.asarray([s], np.float64), reference), 6)
  return out


def pareto_markdown(results: dict) -> str:
  """The hypervolume table of report.md (empty when the run has no Pareto record)."""
  par = results.get("pareto")
  if not par:
    return ""
  hv = par["hypervolume"]
  names = list(dict.fromkeys(list(hv["dev"]) + list(hv.get("test", {}))))
  fmt = lambda v: "–" if v is None else f"{v:.4f}"
  lines = [f"## Multi-objective: hypervolume over {', '.join(results['tasks'])}", "",
           f"Reference point {par['reference']} on every task; hypervolume as a fraction of "
           f"the box up to {UTOPIA:g}. Fronts: `pool` (the checkpoints), `search` (every merge "
           "the main search evaluated), `all` (with the sweep and the seeds). "
           f"{len(par['front'])} merges on the overall dev front.", "",
           "| method | dev | test |", "|---|---|---|"]
  for n in names:
    lines.append(f"| {n} | {fmt(hv['dev'].get(n))} | {fmt(hv.get('test', {}).get(n))} |")
  if par.get("sweep"):
    lines += ["", "Sweep (best merge of each search, dev scores):", "",
              "| scalarization | task weights | " + " | ".join(results["tasks"]) + " |",
              "|" + "---|" * (len(results["tasks"]) + 2)]
    for s in par["sweep"]:
      cells = " | ".join("–" if s["best_scores"].get(t) is None
                         else f"{s['best_scores'][t]:.1f}" for t in results["tasks"])
      lines.append(f"| {s['scalarization']} | {s['task_weights']} | {cells} |")
  return "\n".join(lines) + "\n"


def front_record(results: dict, archive, sweeps: Sequence[Sweep], space, test: np.ndarray,
                 pool_dev: np.ndarray, pool_test: np.ndarray, reference: float = 0.0) -> dict:
  """results['pareto']: the dev front over every evaluated merge (with test scores), the
  sweep's best merges, and hypervolumes on dev and test.

  Fronts: 'pool' (the checkpoints), 'search' (the main search's merges), 'all' (with the
  seeds and the sweep). test: [K, T + R] scores of `test_needed`'s points, in its order
  (scored on test only because they are on a dev front: no merge is chosen on test).
  Every method is also one point. space: the points' `spaces.MergeSpace` (their
  per-checkpoint weights); None when the points are those weights.
  """
  tasks = results["tasks"]
  t = len(tasks)
  sources, points, dev = evaluated(archive, sweeps)
  front, s_idx, s_front = _fronts(sources, dev)
  need = np.union1d(front, s_front).astype(int)
  test = dict(zip(need.tolist(), np.asarray(test)[:, :t])) if len(need) else {}
  weights_of = (lambda p: p) if space is None else space.checkpoint_weights
  hv = lambda p: round(hypervolume(np.reshape(np.asarray(p, np.float64), (-1, t)), reference), 6)
  scores = lambda row: dict(zip(tasks, _json_row(row, 4)))
  sweep_best = []
  for rec in sweeps:
    b = rec.archive
    i = b.best()
    sweep_best.append({"scalarization": rec.scalarization, "task_weights": rec.task_weights,
                       "best_scores": scores(b.scores[i]),
                       "best_weights": np.round(weights_of(b.points[i]), 6).tolist()})
  return {
      "reference": reference,
      "front": [{"source": sources[i], "weights": np.round(weights_of(points[i]), 6).tolist(),
                 "point": np.round(points[i], 6).tolist(), "dev": scores(dev[i]),
                 "test": scores(test[i])} for i in front],
      "hypervolume": {
          "dev": {"pool": hv(pool_dev[:, :t]), "search": hv(dev[s_idx]), "all": hv(dev),
                  **point_hypervolumes(results["methods"], tasks, "dev", reference)},
          "test": {"pool": hv(pool_test[:, :t]), "search": hv([test[i] for i in s_front]),
                   "all": hv([test[i] for i in front]),
                   **point_hypervolumes(results["methods"], tasks, "test", reference)}},
      "sweep": sweep_best,
      # The sweep's merges (the main search's are in results['history']), for the figures.
      "evaluated": [_json_row(row, 3) for row in dev[int(archive.full().sum()):]],
  }


def _json_row(row, decimals: int) -> list:
  """Rounded floats, None for NaN (results.json is strict JSON)."""
  return [round(float(v), decimals) if np.isfinite(v) else None for v in row]
