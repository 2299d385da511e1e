"""Scoring a population of merges in one compiled program, with a cache keyed by weights.

`score_population(points[P, N], pool, datas) -> scores[P, T]` merges every candidate and
evaluates it on every task without returning to the host. Small models vmap the
population (all P merged models resident at once); large ones `lax.map` it (one merged
model at a time, each a sharded merge-and-evaluate inside the same program). The choice
is made from sizes and the backend, and can be overridden with `choose_mode.mode`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from recycle_jax.evaluation import kinds
from recycle_jax.evaluation import scorers
from recycle_jax.merging import kernels
from recycle_jax.models import partitioning
from recycle_jax.runtime.errors import check
from recycle_jax.evaluation.task_data import TaskData

PyTree = Any


def tree_bytes(tree: PyTree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def choose_mode(pool: Sequence[PyTree], population_size: int, mode: str = "auto",
                memory_budget_gb: float = 4.0) -> str:
  """'vmap' when P merged copies fit the budget (per device), else 'map'; always 'map' on
  CPU, where a vmapped population's batched matmuls (one weight matrix per candidate) run
  slower than one candidate at a time (benchmarks/search_throughput.py: 15-20%)."""
  if mode != "auto":
    return mode
  if jax.default_backend() == "cpu":
    return "map"
  per_device = tree_bytes(pool[0]) / max(jax.device_count(), 1)
  return "vmap" if population_size * per_device <= memory_budget_gb * 2**30 else "map"


def make_population_fn(score: Callable, mode: str,
                       merge: Callable = kernels.linear) -> Callable:
  """(points[P, D], pool, datas) -> (scores[P, T], finite[P]); pure and jittable. When
  splits are scored on the host (`kinds.on_host`: `generate` tasks), it returns
  (scores[P, T], finite[P], tokens) and `pipelined` finishes the scores.

  merge(points[D], pool) -> params: the linear merge, or a `MergeSpace.merge` (then `pool`
  is that space's operands and points its points).
  """
  def one(points, pool, datas):
    params = merge(points, pool)
    out = score(params, datas)
    if isinstance(out, tuple):  # (scores, tokens of the host-scored splits)
      return out[0], kernels.all_finite(params), out[1]
    return out, kernels.all_finite(params)

  def population(points, pool, datas):
    if mode == "vmap":
      return jax.vmap(one, in_axes=(0, None, None))(points, pool, datas)
    return jax.lax.map(lambda a: one(a, pool, datas), points)
  return population


def jit_population(population_fn: Callable, pool: PyTree, mesh) -> Callable:
  """The population program with explicit shardings: weights in and scores out
  replicated, the pool (or a merge space's operands) as restored (parameter dims over
  'model'), the splits as `task_data.place` put them (rows over 'data')."""
  rep = partitioning.replicated(mesh)
  return jax.jit(population_fn, out_shardings=rep,
                 in_shardings=(rep, partitioning.shardings_of(pool), None))


def pipelined(population_fn: Callable, points: np.ndarray, pool, datas: tuple[TaskData, ...],
              width: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores [K, T], finite [K]) of K candidates, `width` at a time (the last batch padded
  by repeating its last row). Every batch's program is dispatched before any result is
  waited for, and host-scored splits are verified on verifier threads
  (`scorers.finish_async`), so the verifiers work while the device decodes the next
  batch."""
  points = np.asarray(points, np.float32)
  pending = []
  for start in range(0, len(points), width):
    idx = list(range(start, min(start + width, len(points))))
    out = population_fn(points[idx + [idx[-1]] * (width - len(idx))], pool, datas)
    pending.append((len(idx), scorers.finish_async(out, datas)
                    if kinds.on_host(datas) else out))
  scores, finite = [], []
  for n, out in pending:
    s, f = out.result() if hasattr(out, "result") else jax.device_get(out)
    scores.append(np.asarray(s)[:n])
    finite.append(np.asarray(f)[:n])
  return np.concatenate(scores), np.concatenate(finite)


def weights_key(points: np.ndarray, decimals: int = 6) -> bytes:
  """Cache key of a normalized weight vector (rounded so float noise collides)."""
  return np.round(np.asarray(points, np.float64), decimals).tobytes()


@dataclasses.dataclass
class CachedScorer:
  """Scores arbitrary weight vectors on a split, P at a time, remembering every result."""
  population_fn: Callable  # jitted (points, pool, datas) -> (scores, finite)
  pool: Sequence[PyTree]
  population_size: int
  cache: dict = dataclasses.field(default_factory=dict)
  hits: int = 0

  def __call__(self, points: np.ndarray, datas: tuple[TaskData, ...],
               split: str) -> np.ndarray:
    """points [K, N] (normalized) -> scores [K, T]; NaN where the merge was not finite."""
    points = np.asarray(points, np.float32)
    names = tuple(d.name for d in datas)
    keys = [(split, names, weights_key(a)) for a in points]
    todo = [i for i, k in enumerate(keys) if k not in self.cache]
    self.hits += len(keys) - len(todo)
    if todo:
      # Batches of the compiled population shape; a lone candidate (greedy soup, one-off
      # evaluations) gets its own 1-wide program instead of paying for P.
      width = 1 if len(todo) == 1 else self.population_size
      scores, finite = pipelined(self.population_fn, points[todo], self.pool, datas, width)
      for j, i in enumerate(todo):
        self.cache[keys[i]] = np.where(finite[j], scores[j], np.nan)
    return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, len(datas)))


@dataclasses.dataclass
class Programs:
  """A run's compiled programs: per (merge space, population size), the population program
  merging points of that space and scoring them, with its cache of scores (the linear one,
  a searched space's); the program scoring one tree merged elsewhere (the merge methods'
  baselines); and the searches' compiled generations (`search.Search.programs`). Each is
  compiled once per shape."""
  score: Callable  # (params, datas) -> [T] scores
  params: tuple  # the pool, placed
  base: PyTree | None
  mesh: Any
  choose_mode: Callable  # (params, population size) -> 'vmap' | 'map'
  # (params, datas) -> [sum E] per-item hits (`irt.item_scorer`): IRT fitness's calibration.
  items: Callable | None = None
  scorers: dict = dataclasses.field(default_factory=dict)
  generations: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Shared by every method's candidates; scores replicated, as the population program's
    # (every process reads them whole).
    self.score_tree = jax.jit(self.score, out_shardings=partitioning.replicated(self.mesh))
    self.finite = jax.jit(kernels.all_finite)

  def score_trees(self, trees: Sequence[PyTree], datas: tuple[TaskData, ...]) -> np.ndarray:
    """Scores [K, T] of parameter trees merged elsewhere (a merge method's candidates), by
    the program made for one tree; NaN rows for non-finite trees (not scored)."""
    out = np.full((len(trees), len(datas)), np.nan, np.float32)
    for i, tree in enumerate(trees):
      if bool(self.finite(tree)):
        out[i] = scorers.evaluate(self.score_tree, tree, datas)
    return out

  def scorer(self, space, size: int) -> CachedScorer:
    """The CachedScorer of `space` (a spaces.MergeSpace), `size` points at a time; every
    linear space shares the pool's own program."""
    return self._cached(self.score, "scores", space, size)

  def item_scorer(self, space, size: int) -> CachedScorer:
    """The CachedScorer of `space`'s per-item hits ([K, sum E]: `items`), `size` points at
    a time: one per run, so every search and configuration of the run (IRT fitness's
    calibration of the same seeds, each search seed, Fisher and random items) scores a
    point item by item once and compiles the program once."""
    check(self.items is not None, "this run has no per-item program", "Programs.items",
          "build the run's Programs with items=irt.item_scorer(decoder)")
    return self._cached(self.items, "items", space, size)

  def _cached(self, score: Callable, what: str, space, size: int) -> CachedScorer:
    key = (what, "linear", size) if space.is_linear else (what, space, size)
    if key not in self.scorers:
      merge = kernels.linear if space.is_linear else space.merge
      operands = tuple(self.params) if space.is_linear else space.operands(self.params,
                                                                           self.base)
      fn = make_population_fn(score, self.choose_mode(self.params, size), merge)
      self.scorers[key] = CachedScorer(jit_population(fn, operands, self.mesh), operands,
                                       size)
    return self.scorers[key]


def log_nonfinite(points: np.ndarray, fitness: np.ndarray, where: str) -> None:
  for a, f in zip(points, fitness):
    if not np.isfinite(f):
      logging.warning("%s: candidate %s evaluated to %s; given the worst fitness",
                      where, np.round(a, 4).tolist(), f)
