"""The search strategies as one registry: a record per evosax algorithm, saying how to build
it over R^dim around a centre with a step size, and how its state starts.

evosax has two families with different `init`s: distribution-based algorithms (CMA-ES,
SNES, ...) start from a mean, `init(key, mean, params)`; population-based ones
(differential evolution, PSO, genetic algorithms) from a population and its fitness,
`init(key, population, fitness, params)`. Both then `ask` and `tell` alike, so the search's
generation is the same program for every entry. tests/test_strategies.py runs each entry.

`optuna_cmaes` is the paper's optimizer, Optuna's CmaEsSampler, run on the host: each
generation asks P trials, the same compiled population program scores them, and their
fitness is told back (`OptunaStudy`).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.runtime.registry import Registry


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str  # also the evosax.algorithms class name
  population_based: bool = False
  host = False  # asked and told inside the compiled generation
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


class OptunaStudy:
  """An Optuna study whose CmaEsSampler proposes P points a generation (maximizing).

  Coordinates are suggested within per-dimension bounds (weights in [0, 1], as the paper;
  tuned hyperparameters' unbounded coordinates in [-4, 4]); the sampler starts at `center`
  with step `sigma` and is seeded, or, warm started, where Optuna's own warm start puts it
  (`warm_start`). Its whole state is its history: replaying the same calls (`history`,
  `warm_start`, `ask`, `tell`) on a fresh study reproduces every proposal bit for bit,
  which is how a search resumes (Optuna keeps its CMA state inside the in-memory study;
  nothing of it is written to disk or read back from it).
  """

  def __init__(self, pop: int, center: np.ndarray, sigma: float, seed: int,
               lo: Sequence[float], hi: Sequence[float]):
    import optuna  # noqa: PLC0415 (only for this strategy)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    self.pop, self.seed = pop, seed
    self.names = [f"x{i:04d}" for i in range(len(center))]
    self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    self.dists = {k: optuna.distributions.FloatDistribution(float(a), float(b))
                  for k, a, b in zip(self.names, self.lo, self.hi)}
    x0 = dict(zip(self.names, np.clip(np.asarray(center, np.float64), self.lo, self.hi).tolist()))
    self.study = optuna.create_study(direction="maximize",
                                     sampler=self._sampler(x0=x0, sigma0=float(sigma)))
    self._trials: list = []

  def _sampler(self, **start):
    import optuna  # noqa: PLC0415
    with warnings.catch_warnings():  # x0 and sigma0 are deprecated (not removed) in 4.9,
      warnings.simplefilter("ignore")  # source_trials is experimental
      return optuna.samplers.CmaEsSampler(seed=self.seed, popsize=self.pop,
                                          warn_independent_sampling=False, **start)

  def _params(self, x: np.ndarray) -> dict:
    return dict(zip(self.names, np.clip(np.asarray(x, np.float64), self.lo, self.hi).tolist()))

  def _completed(self, x: np.ndarray, fitness: np.ndarray) -> list:
    import optuna  # noqa: PLC0415
    return [optuna.trial.create_trial(params=self._params(r), distributions=self.dists,
                                      value=_told(f)) for r, f in zip(x, fitness)]

  def history(self, x: np.ndarray, fitness: np.ndarray) -> None:
    """Already evaluated points [K, D] as completed trials: they define the search space
    (so CMA-ES proposes from the first trial), as the paper seeds the search history. The
    sampler does not learn from them (they carry no CMA generation): see `warm_start`."""
    self.study.add_trials(self._completed(x, fitness))

  def warm_start(self, x: np.ndarray, fitness: np.ndarray) -> None:
    """Optuna's warm start (CmaEsSampler(source_trials=...), WS-CMA-ES): CMA-ES starts at
    the mean of the best 10% of the evaluated points [K, D], with their spread plus 0.1 in
    the [0, 1]-scaled box as its step. Enqueued trials (`enqueue_trial`) would not do it:
    they carry no CMA generation, so the sampler never learns from them and the search
    started at the box's centre whatever the seeds. Points are repeated to at least 10
    (Optuna needs one in its top 10%): the same distribution, from the best one."""
    idx = np.resize(np.arange(len(x)), max(10, len(x)))
    self.study.sampler = self._sampler(source_trials=self._completed(x[idx], fitness[idx]))

  def ask(self) -> np.ndarray:
    """[P, D] float32 proposals (P trials, kept until `tell`)."""
    self._trials = [self.study.ask(self.dists) for _ in range(self.pop)]
    return np.asarray([[t.params[k] for k in self.names] for t in self._trials], np.float32)

  def tell(self, fitness: np.ndarray) -> None:
    """The last asked trials' fitness (NaN: the worst)."""
    for t, f in zip(self._trials, np.asarray(fitness)):
      self.study.tell(t, _told(f))
    self._trials = []


WORST = -1e9  # the fitness told for a non-finite candidate (maximizing)


def _told(f) -> float:
  f = float(np.float32(f))  # as archived, so a replay tells the very same value
  return f if np.isfinite(f) else WORST


@dataclasses.dataclass(frozen=True)
class HostStrategy:
  """A strategy asked and told on the host (one record per library)."""
  name: str
  study: Callable[..., Any]  # (pop, center, sigma, seed, lo, hi) -> study
  population_based = False
  host = True


def _random_search(sigma: float, center: jax.Array) -> dict:
  """center + sigma * N(0, I) every generation: the first CMA-ES generation, forever (the
  same-budget ablation)."""
  return {"sampling_fn": lambda k: center + sigma * jax.random.normal(k, center.shape)}


def _simple_ga(sigma: float, center: jax.Array) -> dict:
  import optax  # noqa: PLC0415
  return {"std_schedule": optax.constant_schedule(sigma)}


REGISTRY: Registry[Strategy | HostStrategy] = Registry("search strategy", "SearchConfig.strategy")
for _s in (
    Strategy("CMA_ES"),
    Strategy("Sep_CMA_ES"),
    Strategy("SNES"),
    Strategy("RandomSearch", options=_random_search),
    Strategy("DifferentialEvolution", population_based=True),
    Strategy("PSO", population_based=True),
    Strategy("SimpleGA", population_based=True, options=_simple_ga),
    HostStrategy("optuna_cmaes", OptunaStudy),
):
  REGISTRY.register(_s)
get = REGISTRY.get


