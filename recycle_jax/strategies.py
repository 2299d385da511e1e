"""The search strategies as one registry: a record per evosax algorithm, saying how to build
it over R^dim around a centre with a step size, and how its state starts.

evosax has two families with different `init`s: distribution-based algorithms (CMA-ES,
SNES, ...) start from a mean, `init(key, mean, params)`; population-based ones
(differential evolution, PSO, genetic algorithms) from a population and its fitness,
`init(key, population, fitness, params)`. Both then `ask` and `tell` alike, so the search's
generation is the same program for every entry. tests/test_strategies.py runs each entry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from recycle_jax.errors import check


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str  # also the evosax.algorithms class name
  population_based: bool = False
  # Extra constructor arguments from (sigma, centre [dim]): RandomSearch's sampler,
  # SimpleGA's mutation scale.
  options: Callable[[float, jax.Array], dict] | None = None

  def make(self, pop: int, dim: int, sigma: float, center=None) -> tuple[Any, Any]:
    """(the evosax algorithm over R^dim, its params with the step size sigma)."""
    import evosax.algorithms  # noqa: PLC0415 (its import touches the devices: see cli)
    center = jnp.zeros(dim) if center is None else jnp.asarray(center, jnp.float32)
    extra = self.options(sigma, center) if self.options else {}
    es = getattr(evosax.algorithms, self.name)(population_size=pop, solution=jnp.zeros(dim),
                                               **extra)
    params = es.default_params
    if hasattr(params, "std_init"):
      params = params.replace(std_init=sigma)
    return es, params

  def init(self, es, params, key: jax.Array, mean: jax.Array, sigma: float):
    """The algorithm's state around `mean`: a population-based one starts from
    mean + sigma * N(0, I), not yet evaluated (fitness +inf, evosax minimizing)."""
    if not self.population_based:
      return es.init(key, mean, params)
    k_pop, k_init = jax.random.split(key)
    population = mean + sigma * jax.random.normal(k_pop, (es.population_size,) + mean.shape)
    return es.init(k_init, population, jnp.full((es.population_size,), jnp.inf), params)


def _random_search(sigma: float, center: jax.Array) -> dict:
  """center + sigma * N(0, I) every generation: the first CMA-ES generation, forever (the
  same-budget ablation)."""
  return {"sampling_fn": lambda k: center + sigma * jax.random.normal(k, center.shape)}


def _simple_ga(sigma: float, center: jax.Array) -> dict:
  import optax  # noqa: PLC0415
  return {"std_schedule": optax.constant_schedule(sigma)}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("CMA_ES"),
    Strategy("Sep_CMA_ES"),
    Strategy("SNES"),
    Strategy("RandomSearch", options=_random_search),
    Strategy("DifferentialEvolution", population_based=True),
    Strategy("PSO", population_based=True),
    Strategy("SimpleGA", population_based=True, options=_simple_ga),
)}


def get(name: str) -> Strategy:
  check(name in STRATEGIES, f"unknown search strategy {name!r}", "SearchConfig.strategy",
        f"choose from {list(STRATEGIES)}")
  return STRATEGIES[name]
