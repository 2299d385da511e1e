"""IRT fitness: candidates scored on a few informative dev items per task, their full-split
scores estimated (`evaluation.irt`), the estimate refined as full-fidelity points accrue.

A `Calibration` holds the per-item correctness [M, E] of every point scored on the full
dev split (the seeds: single checkpoints and linear baselines; then the candidates the
search promotes) and fits each task's 2PL model on it. Its `subset()` is what the search's
compiled generation reads (`Subset`: the chosen items' splits and each task's fitted
items): the items are chosen once, so the program's shapes never change; a refit only
changes the items' numbers. Two choices of items (`SearchConfig.irt_select`):
  fisher  the k items of most Fisher information around the calibration abilities,
          scored by gp-IRT;
  random  k random items, scored by their plain mean (the comparison at equal cost).
Every `irt_promote_every` generations the search scores its best estimated candidate of
those generations on the full split (a full-fidelity point, so the returned merge is
one; its answers join the calibration and the model is refitted).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.evaluation import irt, task_data
from recycle_jax.runtime.errors import check
from recycle_jax.search import population

SELECT = ("fisher", "random")


@flax.struct.dataclass
class Subset:
  """The chosen items of every dev task (placed splits) and each task's fitted items."""
  datas: tuple
  items: tuple  # irt.TaskItems per task
  sizes: tuple = flax.struct.field(pytree_node=False)  # K per task
  fraction: float = flax.struct.field(pytree_node=False)  # sum K / sum E

  def scores(self, hits: jax.Array) -> jax.Array:
    """hits [P, sum K] -> [P, T] estimated full-split scores (percentages)."""
    ends = np.cumsum(self.sizes)
    return jnp.stack([100.0 * irt.estimate(hits[:, e - k:e], it)
                      for k, e, it in zip(self.sizes, ends, self.items)], -1)


@dataclasses.dataclass
class Calibration:
  """Per-item correctness of the full-fidelity points and the IRT fit on it.

  items: the run's cached per-item scorer of the search's space (`Programs.item_scorer`:
  points [K, D] -> hits [K, sum E], NaN rows for non-finite merges), shared by every
  search of the run, so the seeds are scored item by item once, not once per search;
  dev: the placed full dev splits; host_dev: the same splits on the host (cut to the
  chosen items once)."""
  items: population.CachedScorer
  dev: tuple
  host_dev: tuple
  mesh: Any
  k: int
  select: str = "fisher"
  responses: list = dataclasses.field(default_factory=list)  # per task [M, E]
  chosen: list | None = None  # per task: the item indices
  datas: tuple | None = None

  def __post_init__(self):
    check(self.select in SELECT, f"unknown IRT item choice {self.select!r}",
          "SearchConfig.irt_select", f"choose from {', '.join(SELECT)}")
    irt.check_items(self.host_dev, self.k)
    self.sizes = [int(d.num_examples) for d in self.host_dev]

  def score(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points [K, D] on the full dev splits: (scores [K, T], finite [K]); their answers
    join the calibration."""
    hits = self.items(points, self.dev, "dev")
    fin = ~np.isnan(hits).any(-1)  # hits are 0 or 1: NaN only where the merge was not finite
    per = np.split(np.asarray(hits, np.float32), np.cumsum(self.sizes)[:-1], axis=1)
    for t, h in enumerate(per):
      if len(self.responses) <= t:
        self.responses.append(h[fin])
      else:
        self.responses[t] = np.concatenate([self.responses[t], h[fin]])
    scores = np.stack([100.0 * h.mean(-1) for h in per], -1)
    return np.where(fin[:, None], scores, np.nan), fin

  @property
  def item_fn(self) -> Callable:
    """The jitted population program over items ((points, operands, datas) ->
    (hits [P, sum E], finite [P])): what the search's generation scores its subset with."""
    return self.items.population_fn

  def subset(self) -> Subset:
    """The items fitted on the calibration so far (chosen on the first call)."""
    fits = [irt.fit(r) for r in self.responses] if self.select == "fisher" else None
    if self.chosen is None:
      self.chosen = []
      for t, d in enumerate(self.host_dev):
        if fits is not None:
          a, b, theta = fits[t]
          self.chosen.append(irt.choose(a, b, theta, self.k))
        else:
          rng = np.random.default_rng([0, *map(ord, d.name)])
          self.chosen.append(np.sort(rng.choice(self.sizes[t], self.k, replace=False)))
      self.datas = task_data.place(tuple(irt.take(d, idx) for d, idx in
                                         zip(self.host_dev, self.chosen)), self.mesh)
    items = tuple(irt.calibrate(r, idx, fits[t]) if fits is not None else
                  irt.plain_mean(self.sizes[t], idx)
                  for t, (r, idx) in enumerate(zip(self.responses, self.chosen)))
    return Subset(self.datas, items, tuple(len(c) for c in self.chosen),
                  sum(map(len, self.chosen)) / sum(self.sizes))
