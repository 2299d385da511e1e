"""Evolutionary search over merge weights: one CMA-ES generation is one XLA program.

  generation(state, pool, datas):
      x      = es.ask(state)                    [P, N] unnormalized
      alphas = parametrize(x)                   [P, N] on the simplex
      scores = score_population(alphas, ...)    [P, T] merged + evaluated on device
      fitness = scalarize(scores)               macro-average (maximized), or a weighted /
                                                Chebyshev scalarization (pareto.py)
      state  = es.tell(x, -fitness)             evosax minimizes
G generations are a `lax.scan` of it, or one call per generation when the search state is
checkpointed (then `--resume` continues bit-for-bit). Every evaluated merge goes to the
archive; NaN candidates get the worst fitness and are logged.

What is searched is a `spaces.MergeSpace` (linear weights by default; layer-wise weights,
task-vector methods and their hyperparameters otherwise): x and alphas are then [P, D].
The compiled generation is shared by every Search with the same program (seeds, budgets
and scalarization weights are runtime values), so repeated seeds and sweeps compile once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import flax.serialization
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from recycle_jax import checkpoints, pareto, population, spaces, strategies
from recycle_jax.errors import UserError, check

PyTree = Any
WORST = 1e9  # minimized fitness given to NaN candidates
STATE_DIR = "search_state"  # under a search's workdir: its Orbax checkpoints and signature


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SearchConfig:
  budget: int = 50  # evaluated merges, excluding warm-start seeds
  population_size: int | None = None  # None: 4 + floor(3 ln N), as the paper
  sigma_init: float = 1.0
  strategy: str = "CMA_ES"
  parametrization: str = "relu_normalize"
  warm_start: bool = False  # tell the best single checkpoints/baselines first
  seed: int = 0
  merge_space: str = "linear"  # spaces.make_space: 'layerwise', 'ties', ... (its hparams
  #                               and whether they are tuned: make_space.lam/density/tune)
  scalarization: str = "mean"  # 'mean' | 'weighted' | 'chebyshev' (pareto.scalarize)
  task_weights: Sequence[float] | None = None  # tradeoff weights, one per searched task

  def pop_size(self, n: int) -> int:
    return self.population_size or 4 + int(math.floor(3 * math.log(n)))

  def num_generations(self, n: int) -> int:
    return max(1, self.budget // self.pop_size(n))


STRATEGIES = strategies.STRATEGIES  # the registry, by name


@flax.struct.dataclass
class SearchState:
  es_state: Any
  key: jax.Array  # raw uint32 key data, so Orbax can save it
  generation: jax.Array


@dataclasses.dataclass
class Archive:
  """Every evaluated merge, in order."""
  x: list = dataclasses.field(default_factory=list)
  alphas: list = dataclasses.field(default_factory=list)
  scores: list = dataclasses.field(default_factory=list)  # [T] dev scores
  fitness: list = dataclasses.field(default_factory=list)
  kind: list = dataclasses.field(default_factory=list)  # 'seed' or 'search'

  def add(self, x, alphas, scores, fitness, kind) -> None:
    for row in zip(x, alphas, scores, fitness):
      self.x.append(np.asarray(row[0])); self.alphas.append(np.asarray(row[1]))
      self.scores.append(np.asarray(row[2])); self.fitness.append(float(row[3]))
      self.kind.append(kind)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"x": np.asarray(self.x, np.float32), "alphas": np.asarray(self.alphas, np.float32),
            "scores": np.asarray(self.scores, np.float32),
            "fitness": np.asarray(self.fitness, np.float32),
            "is_seed": np.asarray([k == "seed" for k in self.kind], bool)}

  @classmethod
  def from_arrays(cls, a: dict) -> "Archive":
    out = cls()
    for x, al, s, f, seed in zip(a["x"], a["alphas"], a["scores"], a["fitness"], a["is_seed"]):
      out.add([x], [al], [s], [f], "seed" if seed else "search")
    return out

  def best(self) -> int:
    f = np.where(np.isfinite(self.fitness), self.fitness, -np.inf)
    return int(np.argmax(f))

  def __len__(self) -> int:
    return len(self.fitness)


# (program-shaping config, space, population_fn) -> the Search whose jitted functions run it
_PROGRAMS: dict = {}


@dataclasses.dataclass
class Search:
  """Builds the compiled generation for a pool and a tuple of dev TaskData."""
  cfg: SearchConfig
  n: int  # pool size
  population_fn: Callable  # (alphas, pool, datas) -> (scores [P, T], finite [P])
  space: spaces.MergeSpace | None = None  # None: linear weights over the n checkpoints

  def __post_init__(self):
    self.space = self.space or spaces.MergeSpace(n=self.n)
    self.dim = self.space.dim
    self.pop = self.cfg.pop_size(self.dim)
    self.weights, self.chebyshev = pareto.scalarization_args(self.cfg.scalarization,
                                                             self.cfg.task_weights)
    program = (dataclasses.replace(self.cfg, budget=0, seed=0, warm_start=False,
                                   scalarization="mean", task_weights=None),
               self.space, self.population_fn)
    owner = _PROGRAMS.setdefault(program, self)
    if owner is self:
      self.strategy = strategies.get(self.cfg.strategy)
      self.es, self.es_params = self.strategy.make(self.pop, self.dim, self.cfg.sigma_init,
                                                   self.space.init_x())
      self.parametrize = spaces.get_parametrization(self.cfg.parametrization)
      self._jit_generation = jax.jit(self._generation)
      self.tell_seeds = jax.jit(self._tell_seeds)
    else:
      self.strategy, self.es, self.es_params = owner.strategy, owner.es, owner.es_params
      self.parametrize = owner.parametrize
      self._jit_generation, self.tell_seeds = owner._jit_generation, owner.tell_seeds

  def generation(self, state: SearchState, pool, datas):
    weights = self.weights
    if weights is None and datas is not None:  # the mean as uniform weights: always an
      weights = np.full(len(datas), 1.0 / len(datas), np.float32)  # array, one program
    return self._jit_generation(state, pool, datas, weights, self.chebyshev)

  def fitness(self, scores: np.ndarray) -> np.ndarray:
    """This search's scalarization of [..., T] scores, on the host (for seeds)."""
    return np.asarray(pareto.scalarize(scores, self.weights, self.chebyshev))

  def init(self, mean: np.ndarray | None = None) -> SearchState:
    key = jax.random.key(self.cfg.seed)
    key, k_init = jax.random.split(key)
    mean = jnp.asarray(self.space.init_x() if mean is None else mean)
    es_state = self.strategy.init(self.es, self.es_params, k_init, mean, self.cfg.sigma_init)
    # Strong dtypes, as a generation returns them: else the second generation recompiles.
    es_state = jax.tree.map(lambda v: jnp.asarray(v, jnp.result_type(v)), es_state)
    return SearchState(es_state, jax.random.key_data(key), jnp.zeros((), jnp.int32))

  def _tell(self, state: SearchState, key, x, fitness):
    safe = jnp.where(jnp.isfinite(fitness), -fitness, WORST)
    es_state, _ = self.es.tell(key, x, safe, state.es_state, self.es_params)
    return es_state

  def _generation(self, state: SearchState, pool, datas, weights, chebyshev):
    key = jax.random.wrap_key_data(state.key)
    key, k_ask, k_tell = jax.random.split(key, 3)
    x, es_state = self.es.ask(k_ask, state.es_state, self.es_params)
    alphas = self.space.decode(x, self.parametrize)
    scores, finite = self.population_fn(alphas, pool, datas)
    scores = jnp.where(finite[:, None], scores, jnp.nan)  # as in CachedScorer
    fitness = jnp.where(finite, pareto.scalarize(scores, weights, chebyshev), jnp.nan)
    es_state = self._tell(state.replace(es_state=es_state), k_tell, x, fitness)
    new = SearchState(es_state, jax.random.key_data(key), state.generation + 1)
    return new, (x, alphas, scores, fitness)

  def _tell_seeds(self, state: SearchState, x, fitness):
    key = jax.random.wrap_key_data(state.key)
    key, k_ask, k_tell = jax.random.split(key, 3)
    _, es_state = self.es.ask(k_ask, state.es_state, self.es_params)  # advances counters
    es_state = self._tell(state.replace(es_state=es_state), k_tell, x, fitness)
    return SearchState(es_state, jax.random.key_data(key), state.generation)

  def scan(self, state: SearchState, pool, datas, num_generations: int):
    """All generations as one program (no checkpoints in between)."""
    def body(s, _):
      return self.generation(s, pool, datas)
    return jax.lax.scan(body, state, None, length=num_generations)


# ----------------------------------------------------------------------------- running

def _state_to_save(state: SearchState, archive: Archive) -> dict:
  # Host copies: under several processes Orbax refuses single-device arrays.
  return {"state": jax.device_get(state), "archive": archive.arrays()}


def signature(cfg: SearchConfig, space: spaces.MergeSpace, datas) -> dict:
  """What a resumed search must share with the saved one: everything but the budget
  (which may grow, to extend a finished search)."""
  sig = {f"search.{k}": v for k, v in dataclasses.asdict(cfg).items() if k != "budget"}
  sig.update(dim=space.dim, population=cfg.pop_size(space.dim), merge_space=space.name,
             tasks=[d.name for d in datas] if datas is not None else None)
  return json.loads(json.dumps(sig))  # as it reads back (tuples become lists)


def check_signature(state_dir: str, sig: dict) -> None:
  """Raises UserError when the saved search was run with another config."""
  path = os.path.join(state_dir, "signature.json")
  if not os.path.isfile(path):
    return  # saved before signatures were written
  with open(path) as f:
    old = json.load(f)
  diff = [k for k in sorted(set(old) | set(sig)) if old.get(k) != sig.get(k)]
  if diff:
    k = diff[0]
    raise UserError(f"cannot resume: the saved search has {k} = {old.get(k)!r}, this config "
                    f"{sig.get(k)!r}", "--resume", "resume with the config the search started "
                    "with (only SearchConfig.budget may change), or pass --overwrite")


def run(search: Search, pool, datas, workdir: str | None, resume: bool = False,
        seeds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        progress: bool = True, on_generation: Callable | None = None) -> Archive:
  """Runs the search to its budget, checkpointing after every generation in `workdir`.

  seeds: optional (alphas [S, D], scores [S, T], fitness [S]) of already evaluated points of
  the search's space (single checkpoints, baselines): they enter the archive and, when
  `warm_start`, the top P are told to the strategy before the first generation.
  """
  total = search.cfg.num_generations(search.dim)
  state, archive = search.init(), Archive()
  mngr = None
  if workdir:
    mngr = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, STATE_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if resume and mngr is not None and mngr.latest_step() is not None:
    check_signature(str(mngr.directory), signature(search.cfg, search.space, datas))
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.StandardRestore())
    state = flax.serialization.from_state_dict(state, restored["state"])
    archive = Archive.from_arrays({k: np.asarray(v) for k, v in restored["archive"].items()})
    logging.info("resumed search at generation %d (%d merges archived)", step, len(archive))
  else:
    if seeds is not None:
      alphas, scores, fitness = seeds
      x = search.space.encode(alphas)
      archive.add(x, alphas, scores, fitness, "seed")
      if search.cfg.warm_start:
        order = np.argsort(-np.nan_to_num(fitness, nan=-np.inf))
        top = np.resize(order, search.pop)  # repeats when fewer seeds than P
        state = search.tell_seeds(state, jnp.asarray(x[top]), jnp.asarray(fitness[top]))
    if mngr is not None and jax.process_index() == 0:
      checkpoints.atomic_write_text(os.path.join(str(mngr.directory), "signature.json"),
                                    json.dumps(signature(search.cfg, search.space, datas), indent=1))
    if mngr is not None and len(archive):  # a fresh init needs no checkpoint
      mngr.save(0, args=ocp.args.StandardSave(_state_to_save(state, archive)))
  start = int(state.generation)
  bar = tqdm(range(start, total), desc="search", disable=not progress, initial=start,
             total=total, unit="gen")
  for g in bar:
    # A host copy in: the first, later and resumed generations then share one program
    # (device outputs carry the mesh, a fresh or restored state does not: two compiles).
    state, (x, alphas, scores, fitness) = search.generation(jax.device_get(state), pool,
                                                            datas)
    x, alphas, scores, fitness = jax.device_get((x, alphas, scores, fitness))
    population.log_nonfinite(alphas, fitness, f"generation {g}")
    archive.add(x, alphas, scores, fitness, "search")
    if mngr is not None:
      mngr.save(g + 1, args=ocp.args.StandardSave(_state_to_save(state, archive)))
      mngr.wait_until_finished()
    best = np.nanmax(np.asarray(archive.fitness))
    bar.set_postfix(best=f"{best:.2f}")
    if on_generation is not None:
      on_generation(g, archive)
  if mngr is not None:
    mngr.wait_until_finished()
    mngr.close()
  return archive
