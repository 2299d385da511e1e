"""Evolutionary search over merge weights: one CMA-ES generation is one XLA program.

  generation(state, pool, datas):
      x      = es.ask(state)                    [P, N] unnormalized
      points = parametrize(x)                   [P, N] on the simplex (spaces.REGISTRY)
      scores = score_population(points, ...)    [P, T] merged + evaluated on device
      fitness = scalarize(scores)               macro-average (maximized), or a weighted /
                                                Chebyshev scalarization (pareto.py)
      state  = es.tell(x, -fitness)             evosax minimizes
The search calls it once per generation and checkpoints its state in between (then
`--resume` continues bit-for-bit). Every evaluated merge goes to the
archive; NaN candidates get the worst fitness and are logged. A host strategy
(`optuna_cmaes`) asks and tells on the host around the same compiled evaluation. When some
task is scored on the host (`generate` tasks: greedy decoding on device, then a verifier),
the evaluation runs outside the generation's program: ask (one program), the population
(`population.pipelined`: its halves dispatched back to back, the first half's tokens
verified while the device decodes the second), tell (one program).

Adaptive fidelity (successive halving, `fidelity_subset` < 1): a generation's candidates
are scored first on a fixed random subset of each dev task's examples, and only the best
`fidelity_promote` fraction of them on the full split. A candidate left on the subset gets
its subset scores shifted by the generation's mean (full - subset) gap of the promoted ones,
task by task: the fixed subset's difficulty made comparable with the full split's, from
paired scores of the same generation. The archive records each point's fidelity and how
many dev examples it cost; only full-fidelity points can be the best one.

What is searched is a `spaces.MergeSpace` (linear weights by default; layer-wise weights,
task-vector methods and their hyperparameters otherwise): x and points are then [P, D].
The compiled generation is shared by every Search given the same `programs` cache (the
run's: `experiment` makes one per run) and the same program (seeds, budgets and
scalarization weights are runtime values), so repeated seeds and sweeps compile once.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.runtime import outputs
from recycle_jax.evaluation import kinds
from recycle_jax.runtime import interrupts, quiet, validation, waits
from recycle_jax.search import irt_fitness, pareto, population, strategies
from recycle_jax.merging import spaces
from recycle_jax.runtime.errors import UserError, check

PyTree = Any
STATE_DIR = "search_state"  # under a search's workdir: its Orbax checkpoints and signature


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  budget: int = 50  # evaluated merges, excluding warm-start seeds
  population_size: int | None = None  # None: 4 + floor(3 ln N), as the paper
  sigma_init: float | None = None  # None: the parametrization's (spaces.Parametrization)
  strategy: str = "CMA_ES"
  parametrization: str = "relu_normalize"  # 'relu_normalize' | 'softmax' | 'box'
  fidelity_subset: float = 1.0  # fraction of each dev task's examples a first pass scores
  # Fraction of a generation then scored on the full split: 2 of the population of 12 at
  # N = 16, so with fidelity_subset = 0.15 a search costs 0.15 + 1/6 < 1/3 of the full
  # search's dev evaluations (a promoted candidate scores the whole split again).
  fidelity_promote: float = 1 / 6
  # IRT fitness (search.irt_fitness), instead of adaptive fidelity: every candidate scored
  # on irt_items dev items per task, its full-split scores estimated by a 2PL model fitted
  # on the seeds' per-item correctness; 'fisher': the most informative items, gp-IRT;
  # 'random': random items, their plain mean. Every irt_promote_every generations the best
  # estimate is scored on the full split and joins the fit.
  irt_items: int = 0
  irt_select: str = "fisher"
  irt_promote_every: int = 2
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

  def sigma(self) -> float:
    param = spaces.get(self.parametrization)
    return param.sigma if self.sigma_init is None else self.sigma_init

  @property
  def adaptive(self) -> bool:
    return self.fidelity_subset < 1.0

  @property
  def irt(self) -> bool:
    return self.irt_items > 0

  def promoted(self, pop: int) -> int:
    """Candidates of a generation scored on the full split (adaptive fidelity)."""
    # The slack keeps 1/6 written as 0.1667 (gin) at 2 of 12, not 3.
    return max(1, min(pop, int(math.ceil(self.fidelity_promote * pop - 1e-3))))




@flax.struct.dataclass
class SearchState:
  es_state: Any
  key: jax.Array  # raw uint32 key data, so Orbax can save it
  generation: jax.Array


@dataclasses.dataclass
class Archive:
  """Every evaluated merge, in order: the strategy's samples x [D'], the merge space's
  points [D] they decode to (per-checkpoint weights in the linear space; `space.
  checkpoint_weights` gives them for any space), dev scores [T], fitness."""
  x: list = dataclasses.field(default_factory=list)
  points: list = dataclasses.field(default_factory=list)
  scores: list = dataclasses.field(default_factory=list)  # [T] dev scores
  fitness: list = dataclasses.field(default_factory=list)
  kind: list = dataclasses.field(default_factory=list)  # 'seed' or 'search'
  # The fraction of the dev examples each point was scored on (1: the full split; else its
  # scores are subset estimates), and how many dev examples scoring it took.
  fidelity: list = dataclasses.field(default_factory=list)
  examples: list = dataclasses.field(default_factory=list)

  def add(self, x, points, scores, fitness, kind, fidelity=None, examples=None) -> None:
    k = len(fitness)
    fidelity = np.ones(k) if fidelity is None else np.asarray(fidelity)
    examples = np.zeros(k) if examples is None else np.asarray(examples)
    for row in zip(x, points, scores, fitness, fidelity, examples):
      self.x.append(np.asarray(row[0])); self.points.append(np.asarray(row[1]))
      self.scores.append(np.asarray(row[2])); self.fitness.append(float(row[3]))
      self.kind.append(kind); self.fidelity.append(float(row[4]))
      self.examples.append(int(row[5]))

  def arrays(self) -> dict[str, np.ndarray]:
    return {"x": np.asarray(self.x, np.float32), "points": np.asarray(self.points, np.float32),
            "scores": np.asarray(self.scores, np.float32),
            "fitness": np.asarray(self.fitness, np.float32),
            "is_seed": np.asarray([k == "seed" for k in self.kind], bool),
            "fidelity": np.asarray(self.fidelity, np.float32),
            "examples": np.asarray(self.examples, np.int64)}

  @classmethod
  def from_arrays(cls, a: dict) -> "Archive":
    out = cls()
    k = len(a["fitness"])  # archives saved before fidelities: all full, uncounted
    fid, ex = a.get("fidelity", np.ones(k)), a.get("examples", np.zeros(k))
    for x, al, s, f, seed, fi, e in zip(a["x"], a["points"], a["scores"], a["fitness"],
                                        a["is_seed"], fid, ex):
      out.add([x], [al], [s], [f], "seed" if seed else "search", [fi], [e])
    return out

  def full(self) -> np.ndarray:
    """[K] bool: points scored on the full dev split (their scores are not estimates)."""
    return np.asarray(self.fidelity, np.float64) >= 1.0

  def best(self) -> int:
    """The best full-fidelity point."""
    f = np.where(np.isfinite(self.fitness) & self.full(), self.fitness, -np.inf)
    return int(np.argmax(f))

  def dev_examples(self) -> int:
    """Dev examples the search's own candidates were scored on (seeds excluded)."""
    return int(sum(e for e, k in zip(self.examples, self.kind) if k == "search"))

  def __len__(self) -> int:
    return len(self.fitness)


@dataclasses.dataclass(frozen=True)
class Seeds:
  """Already evaluated points (single checkpoints, baselines) that enter a search's archive
  first: in the strategy's coordinates x [S, D], as points of the space [S, D], with their
  dev scores [S, T]. Encoded once, they serve a search and its sweep."""
  x: np.ndarray
  points: np.ndarray
  scores: np.ndarray

  @classmethod
  def of(cls, space: spaces.MergeSpace, points: np.ndarray, scores: np.ndarray,
         param: spaces.Parametrization | None = None) -> "Seeds":
    return cls(space.encode(points, param), np.asarray(points, np.float32),
               np.asarray(scores))


@dataclasses.dataclass
class Search:
  """Builds the compiled generation for a pool and a tuple of dev TaskData."""
  cfg: SearchConfig
  n: int  # pool size
  population_fn: Callable  # (points, pool, datas) -> (scores [P, T], finite [P])
  space: spaces.MergeSpace | None = None  # None: linear weights over the n checkpoints
  # The run's compiled programs: (program-shaping config, space, population_fn) -> the
  # Search whose jitted functions run it. None: this Search compiles its own.
  programs: dict | None = None
  # Fingerprints of what it computes on besides the dev data (the pool's members, the
  # base): recorded in the signature, so --resume refuses a changed input.
  inputs: dict | None = None
  # IRT fitness: (points, operands, datas) -> (hits [P, sum E], finite [P]) per item.
  item_fn: Callable | None = None

  def __post_init__(self):
    self.space = self.space or spaces.MergeSpace(n=self.n)
    self.dim = self.space.dim
    self.pop = self.cfg.pop_size(self.dim)
    self.param = spaces.get(self.cfg.parametrization)
    self.sigma = self.cfg.sigma()
    self.study = None  # a host strategy's, made by `init`
    self.weights, self.chebyshev = pareto.scalarization_args(self.cfg.scalarization,
                                                             self.cfg.task_weights)
    program = (dataclasses.replace(self.cfg, budget=0, seed=0, warm_start=False,
                                   scalarization="mean", task_weights=None),
               self.space, self.population_fn)
    owner = ({} if self.programs is None else self.programs).setdefault(program, self)
    if owner is self:
      self.strategy = strategies.get(self.cfg.strategy)
      self.es = self.es_params = self._jit_generation = self.tell_seeds = None
      self._jit_ask = self._jit_told = None
      if not self.strategy.host:
        self.es, self.es_params = self.strategy.make(self.pop, self.dim, self.sigma,
                                                     self.space.init_x(self.param))
        self._jit_generation = jax.jit(self._generation)
        self._jit_ask, self._jit_told = jax.jit(self._ask), jax.jit(self._told)
        self.tell_seeds = jax.jit(self._tell_seeds)
      self._jit_evaluate = jax.jit(self._evaluate)
    else:
      self.strategy, self.es, self.es_params = owner.strategy, owner.es, owner.es_params
      self._jit_generation, self.tell_seeds = owner._jit_generation, owner.tell_seeds
      self._jit_ask, self._jit_told = owner._jit_ask, owner._jit_told
      self._jit_evaluate = owner._jit_evaluate

  def generation(self, state: SearchState, pool, datas, subset=None):
    """One generation -> (state, (x, points, scores, fitness, fidelity)), each [P, ...].
    subset: the dev splits' fixed subsets (adaptive fidelity), or None."""
    weights = self.weights
    if weights is None and datas is not None:  # the mean as uniform weights: always an
      weights = np.full(len(datas), 1.0 / len(datas), np.float32)  # array, one program
    verified = kinds.on_host(datas or ())  # tasks scored by verifiers on the host
    evaluate = (functools.partial(self._evaluate, score=self._pipelined(pool)) if verified
                else self._jit_evaluate)
    if not self.strategy.host:
      if not verified:  # one program: ask, evaluate, tell
        return self._jit_generation(state, pool, datas, subset, weights, self.chebyshev)
      x, es_state, key, k_tell = self._jit_ask(state)
      out = evaluate(x, pool, datas, subset, weights, self.chebyshev)
      return self._jit_told(state, es_state, key, k_tell, x, out[2]), (x, *out)
    x = self.study.ask()
    out = evaluate(jnp.asarray(x), pool, datas, subset, weights, self.chebyshev)
    self.study.tell(np.asarray(jax.device_get(out[2])))
    return state.replace(generation=state.generation + 1), (x, *out)

  def fitness(self, scores: np.ndarray) -> np.ndarray:
    """This search's scalarization of [..., T] scores, on the host (for seeds)."""
    return np.asarray(pareto.scalarize(scores, self.weights, self.chebyshev))

  def init(self, mean: np.ndarray | None = None) -> SearchState:
    key = jax.random.key(self.cfg.seed)
    key, k_init = jax.random.split(key)
    mean = self.space.init_x(self.param) if mean is None else mean
    if self.strategy.host:  # a fresh study; its state is the archive (`replay`)
      k = self.space.num_weights
      lo = [0.0] * k + [-4.0] * (self.dim - k)  # weights in the box, as the paper
      hi = [1.0] * k + [4.0] * (self.dim - k)
      self.study = self.strategy.study(self.pop, np.asarray(mean), self.sigma, self.cfg.seed,
                                       lo, hi)
      es_state = jnp.zeros((), jnp.int32)
    else:
      es_state = self.strategy.init(self.es, self.es_params, k_init, jnp.asarray(mean),
                                    self.sigma)
    # Strong dtypes, as a generation returns them: else the second generation recompiles.
    es_state = jax.tree.map(lambda v: jnp.asarray(v, jnp.result_type(v)), es_state)
    return SearchState(es_state, jax.random.key_data(key), jnp.zeros((), jnp.int32))

  def start(self, state: SearchState, x: np.ndarray, fitness: np.ndarray) -> SearchState:
    """Already evaluated points x [S, D] (seeds): when `warm_start`, the top P are told to
    the strategy first; a host study takes them all as its history and, when `warm_start`,
    starts its CMA-ES from them (Optuna's warm start)."""
    fitness = np.asarray(fitness, np.float32)
    order = np.argsort(-np.nan_to_num(fitness, nan=-np.inf))
    top = np.resize(order, self.pop)  # repeats when fewer seeds than P
    if not self.strategy.host:
      if self.cfg.warm_start:
        state = self.tell_seeds(state, jnp.asarray(x[top]), jnp.asarray(fitness[top]))
      return state
    self.study.history(x, fitness)
    if self.cfg.warm_start:
      self.study.warm_start(x, fitness)
    return state

  def replay(self, archive: "Archive") -> None:
    """Rebuilds a host study from a restored archive by repeating its calls: the seeded
    sampler proposes the archived points again, each checked, and is told their fitness."""
    a = archive.arrays()
    seed = a["is_seed"]
    self.start(None, a["x"][seed], a["fitness"][seed])
    xs, fs = a["x"][~seed], a["fitness"][~seed]
    for g in range(0, len(xs), self.pop):
      x = self.study.ask()
      check(np.array_equal(x, xs[g:g + self.pop]), f"cannot resume: replaying the saved "
            f"search, {self.cfg.strategy} proposed other points at generation {g // self.pop}",
            "--resume", "resume with the same optuna version and config, or pass --overwrite")
      self.study.tell(fs[g:g + self.pop])

  def _pipelined(self, pool) -> Callable:
    """score(points, datas) -> (scores, finite) on the host for verified tasks: the
    population in halves, the first verified while the second decodes."""
    return lambda points, datas: population.pipelined(self.population_fn, points, pool, datas,
                                                      width=-(-len(points) // 2))

  def _evaluate(self, x, pool, datas, subset, weights, chebyshev, score=None):
    """[P, D] samples -> (points, scores [P, T], fitness [P], fidelity [P]); NaN scores and
    fitness for non-finite merges. subset: adaptive fidelity's dev subsets, or None.
    score(points, datas) -> (scores, finite): the population program (default) or, for
    verified tasks, `_pipelined` (then this runs eagerly, outside any program)."""
    score = score or (lambda a, d: self.population_fn(a, pool, d))
    points = self.space.decode(x, self.param)
    fit = lambda s, ok: jnp.where(ok, pareto.scalarize(s, weights, chebyshev), jnp.nan)
    if subset is None:
      scores, finite = score(points, datas)
      fidelity = jnp.ones(x.shape[0], jnp.float32)
    elif isinstance(subset, irt_fitness.Subset):  # estimates from the chosen items
      hits, finite = self.item_fn(points, pool, subset.datas)
      scores = subset.scores(hits)
      fidelity = jnp.full(x.shape[0], subset.fraction, jnp.float32)
    else:
      low, finite = score(points, subset)
      low = jnp.where(finite[:, None], low, jnp.nan)
      top = jnp.argsort(-jnp.nan_to_num(fit(low, finite), nan=-jnp.inf))[
          :self.cfg.promoted(x.shape[0])]
      high, finite_top = score(points[top], datas)
      high = jnp.where(finite_top[:, None], high, jnp.nan)
      diff = high - low[top]
      ok = jnp.isfinite(diff)
      gap = jnp.sum(jnp.where(ok, diff, 0), 0) / jnp.maximum(jnp.sum(ok, 0), 1)  # [T]
      scores = jnp.clip(low + gap, 0.0, 100.0).at[top].set(high)
      finite = jnp.asarray(finite).at[top].set(finite_top)  # host arrays when verified
      fidelity = jnp.full(x.shape[0], self.cfg.fidelity_subset, jnp.float32).at[top].set(1.0)
    scores = jnp.where(finite[:, None], scores, jnp.nan)  # as in CachedScorer
    return points, scores, fit(scores, finite), fidelity

  def _tell(self, state: SearchState, key, x, fitness):
    safe = jnp.where(jnp.isfinite(fitness), -fitness, -strategies.WORST)
    es_state, _ = self.es.tell(key, x, safe, state.es_state, self.es_params)
    return es_state

  def _ask(self, state: SearchState):
    key = jax.random.wrap_key_data(state.key)
    key, k_ask, k_tell = jax.random.split(key, 3)
    x, es_state = self.es.ask(k_ask, state.es_state, self.es_params)
    return x, es_state, jax.random.key_data(key), jax.random.key_data(k_tell)

  def _told(self, state: SearchState, es_state, key, k_tell, x, fitness):
    es_state = self._tell(state.replace(es_state=es_state), jax.random.wrap_key_data(k_tell),
                          x, fitness)
    return SearchState(es_state, key, state.generation + 1)

  def _generation(self, state: SearchState, pool, datas, subset, weights, chebyshev):
    x, es_state, key, k_tell = self._ask(state)
    points, scores, fitness, fidelity = self._evaluate(x, pool, datas, subset, weights,
                                                       chebyshev)
    new = self._told(state, es_state, key, k_tell, x, fitness)
    return new, (x, points, scores, fitness, fidelity)

  def _tell_seeds(self, state: SearchState, x, fitness):
    key = jax.random.wrap_key_data(state.key)
    key, k_ask, k_tell = jax.random.split(key, 3)
    _, es_state = self.es.ask(k_ask, state.es_state, self.es_params)  # advances counters
    es_state = self._tell(state.replace(es_state=es_state), k_tell, x, fitness)
    return SearchState(es_state, jax.random.key_data(key), state.generation)

# ----------------------------------------------------------------------------- running

def _state_to_save(state: SearchState, archive: Archive) -> dict:
  # Host copies: under several processes Orbax refuses single-device arrays.
  return {"state": jax.device_get(state), "archive": archive.arrays()}


def saved_archive(saved: dict) -> dict[str, np.ndarray]:
  """The archive's arrays from a saved state; states saved before the space's points were
  called `points` hold them as `alphas`."""
  return {("points" if k == "alphas" else k): np.asarray(v) for k, v in saved["archive"].items()}


def signature(cfg: SearchConfig, space: spaces.MergeSpace, datas,
              inputs: dict[str, str] | None = None) -> dict:
  """What a resumed search must share with the saved one: everything but the budget
  (which may grow, to extend a finished search); and `inputs`, fingerprints of what it
  computes on: the pool's members and the base (`pool_manifest.fingerprint`), every dev
  split as read on the host (`data_fingerprint`)."""
  sig = {f"search.{k}": v for k, v in dataclasses.asdict(cfg).items() if k != "budget"}
  sig.update(dim=space.dim, population=cfg.pop_size(space.dim), merge_space=space.name,
             tasks=[d.name for d in datas] if datas is not None else None)
  sig.update(inputs or {})
  return json.loads(json.dumps(sig))  # as it reads back (tuples become lists)


def data_fingerprint(d) -> str:
  """sha256 of a host split's arrays (shapes and values): its examples as scored (the
  count `max_examples` leaves, the task's files, the tokenizer)."""
  h = hashlib.sha256(f"{d.num_examples}".encode())
  for x in jax.tree.leaves(jax.device_get(d)):
    x = np.asarray(x)
    h.update(f"{x.shape}{x.dtype}".encode() + np.ascontiguousarray(x).tobytes())
  return h.hexdigest()[:16]


CONTENT = ("pool[", "base", "dev[")  # signature keys naming content, not configuration


def saved_steps(state_dir: str) -> list[int]:
  """Finished steps of a saved search (Orbax marks unfinished ones with a tmp suffix)."""
  if not os.path.isdir(state_dir):
    return []
  return sorted(int(s) for s in os.listdir(state_dir) if s.isdigit())


def check_saved_state(state_dir: str, sig: dict) -> None:
  """Reads a saved search whole (signature, and the latest step's state and archive) before
  a resume touches anything: a damaged or foreign state is one line naming its file."""
  steps = saved_steps(state_dir)
  if not steps:
    return
  check_signature(state_dir, sig)
  step_dir = os.path.join(state_dir, str(steps[-1]))
  fix = ("delete that step directory to resume from the one before, or pass --overwrite "
         "to start again")
  checkpoints.check_metadata_file(step_dir, step_dir)
  try:
    with quiet.abandoned_reads():
      saved = waits.call(lambda: ocp.StandardCheckpointer().restore(
          os.path.join(step_dir, "default")), "reading the search state", step_dir)
    a = saved_archive(saved)
    rows = {len(v) for v in a.values()}
    ok = ({"x", "points", "scores", "fitness", "is_seed"} <= set(a) and len(rows) == 1 and
          a["x"].ndim == 2 and a["x"].shape[1] == sig["dim"] and
          int(np.asarray(saved["state"]["generation"])) == steps[-1])
  except UserError:  # (a read past the bound)
    raise
  except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types)
    raise UserError(f"the saved search state is unreadable (damaged?): {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:120]}", step_dir, fix) from None
  check(ok, "the saved search state is inconsistent (archive or generation)", step_dir, fix)


def check_signature(state_dir: str, sig: dict) -> None:
  """Raises UserError when the saved search was run with another config."""
  path = os.path.join(state_dir, "signature.json")
  check(os.path.isfile(path), "the saved search has no signature.json", state_dir,
        "pass --overwrite to start the search again")
  old = validation.load_json(path, "saved search signature",
                             "pass --overwrite to start the search again")
  check(isinstance(old, dict), "the saved search signature is not an object", path,
        "pass --overwrite to start the search again")
  # A field added since the search was saved counts as its default there.
  defaults = json.loads(json.dumps({f"search.{f.name}": f.default
                                    for f in dataclasses.fields(SearchConfig)}))
  diff = [k for k in sorted(set(old) | set(sig))
          if old.get(k, defaults.get(k)) != sig.get(k, defaults.get(k))]
  content = [k for k in diff if k.startswith(CONTENT)]
  if content:  # what is computed on changed: name it, not its hashes
    what = {"pool[": "pool member {} (its files)", "dev[": "dev split of task {} (its "
            "examples: Experiment.max_examples, the task's files or the tokenizer)",
            "base": "base checkpoint{}"}
    k = content[0]
    pre = next(p for p in CONTENT if k.startswith(p))
    name = k[len(pre):].rstrip("]")
    change = ("is new" if k not in old else "is gone" if k not in sig else
              "differs from the saved search's")
    raise UserError(f"cannot resume: the {what[pre].format(repr(name) if name else '')} "
                    f"{change}", "--resume", "resume with the inputs the search started "
                    "with, or pass --overwrite to start again")
  if diff:
    k = diff[0]
    raise UserError(f"cannot resume: the saved search has {k} = {old.get(k)!r}, this config "
                    f"{sig.get(k)!r}", "--resume", "resume with the config the search started "
                    "with (only SearchConfig.budget may change), or pass --overwrite")


def _promote(search: Search, archive: Archive, calibration: irt_fitness.Calibration,
             last: int, full_n: int) -> None:
  """The best estimated candidate of the archive's `last` rows, scored on the full split:
  its archive row becomes full fidelity, its answers join the calibration."""
  rows = range(len(archive) - last, len(archive))
  fit = [archive.fitness[i] if archive.fidelity[i] < 1.0 else -np.inf for i in rows]
  if not np.isfinite(np.nanmax(np.asarray(fit, np.float64), initial=-np.inf)):
    return  # every one non-finite (or already full)
  i = rows[int(np.nanargmax(fit))]
  scores, finite = calibration.score(np.asarray(archive.points[i])[None])
  archive.scores[i] = scores[0]
  archive.fitness[i] = float(search.fitness(scores)[0]) if finite[0] else float("nan")
  archive.fidelity[i] = 1.0
  archive.examples[i] += full_n


def _examples(datas) -> int:
  return 0 if datas is None else sum(int(d.num_examples) for d in datas)


def run(search: Search, pool, datas, workdir: str | None, resume: bool = False,
        seeds: Seeds | None = None, progress: bool = True,
        on_generation: Callable | None = None, subset=None,
        calibration: irt_fitness.Calibration | None = None) -> Archive:
  """Runs the search to its budget, checkpointing after every generation in `workdir`.

  seeds: already evaluated points of the search's space: they enter the archive (with
  this search's scalarization as fitness) and, when `warm_start`, the top P are told to
  the strategy before the first generation.
  subset: the dev splits' fixed subsets, required when the config is adaptive (the splits
  as `datas`, each cut to a fixed random subset of its examples: `task_data.subset`), or
  with IRT fitness the calibration's `subset()` and the `calibration` itself.
  """
  check(not (search.cfg.adaptive and search.cfg.irt), "adaptive fidelity and IRT fitness "
        "are two ways to score fewer dev examples", "SearchConfig.irt_items",
        "choose one: fidelity_subset < 1 or irt_items > 0")
  check((search.cfg.adaptive or search.cfg.irt) == (subset is not None) and
        search.cfg.irt == (calibration is not None), "adaptive fidelity and IRT fitness "
        "need the dev subsets, and only they", "search.run", "pass subset= exactly when "
        "SearchConfig.fidelity_subset < 1 or irt_items > 0")
  mngr = None
  if workdir:
    mngr = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, STATE_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if resume and mngr is not None and mngr.latest_step() is not None:
    state, archive = _restore(search, mngr, datas)
    if calibration is not None:  # the promoted points join the fit again
      promoted = [p for p, k, f in zip(archive.points, archive.kind, archive.fidelity)
                  if k == "search" and f >= 1.0]
      if promoted:
        calibration.score(np.asarray(promoted))
        subset = calibration.subset()
  else:
    state, archive = _start(search, mngr, datas, seeds)
  try:  # on any exit (Ctrl-C and SIGTERM too) a save in flight is finished
    _generations(search, state, archive, pool, datas, subset, mngr, progress, on_generation,
                 calibration)
  finally:
    if mngr is not None:
      waits.call(mngr.wait_until_finished, "saving the search state", str(mngr.directory))
      mngr.close()
  return archive


def _restore(search: Search, mngr, datas) -> tuple[SearchState, Archive]:
  """The latest saved state and archive (a host study replayed from the archive)."""
  check_signature(str(mngr.directory), signature(search.cfg, search.space, datas,
                                                         search.inputs))
  step = mngr.latest_step()
  with quiet.abandoned_reads():
    restored = waits.call(lambda: mngr.restore(step, args=ocp.args.StandardRestore()),
                          "reading the search state", str(mngr.directory))
  state = flax.serialization.from_state_dict(search.init(), restored["state"])
  archive = Archive.from_arrays(saved_archive(restored))
  if search.strategy.host:
    search.replay(archive)
  logging.info("resumed search at generation %d (%d merges archived)", step, len(archive))
  return state, archive


def _start(search: Search, mngr, datas, seeds: Seeds | None) -> tuple[SearchState, Archive]:
  """A fresh state and archive, the seeds in it (and told, when warm starting), saved."""
  state, archive = search.init(), Archive()
  if seeds is not None:
    fitness = search.fitness(seeds.scores)
    archive.add(seeds.x, seeds.points, seeds.scores, fitness, "seed",
                examples=np.full(len(seeds.x), _examples(datas)))
    state = search.start(state, seeds.x, fitness)
  if mngr is not None and jax.process_index() == 0:
    outputs.write_text(os.path.join(str(mngr.directory), "signature.json"),
                                  json.dumps(signature(search.cfg, search.space, datas,
                                                       search.inputs), indent=1))
  if mngr is not None and len(archive):  # a fresh init needs no checkpoint
    mngr.save(0, args=ocp.args.StandardSave(_state_to_save(state, archive)))
  return state, archive


def _generations(search: Search, state: SearchState, archive: Archive, pool, datas, subset,
                 mngr, progress: bool, on_generation: Callable | None,
                 calibration: irt_fitness.Calibration | None = None) -> None:
  """The generations left to the budget, each archived and saved (with IRT fitness, the
  best estimate of every irt_promote_every generations scored on the full split)."""
  full_n = _examples(datas)
  sub_n = _examples(subset.datas if calibration is not None else subset)
  total, start = search.cfg.num_generations(search.dim), int(state.generation)
  bar = tqdm(range(start, total), desc="search", disable=not progress, initial=start,
             total=total, unit="gen")
  try:
    for g in bar:
      # A host copy in: the first, later and resumed generations then share one program
      # (device outputs carry the mesh, a fresh or restored state does not: two compiles).
      state, out = search.generation(jax.device_get(state), pool, datas, subset)
      x, points, scores, fitness, fidelity = jax.device_get(out)
      population.log_nonfinite(points, fitness, f"generation {g}")
      # Dev examples per candidate: the subset pass for all (adaptive), the full split for
      # the promoted ones (every one otherwise).
      examples = (sub_n if subset is not None else 0) + (fidelity >= 1.0) * full_n
      archive.add(x, points, scores, fitness, "search", fidelity, examples)
      every = search.cfg.irt_promote_every
      if calibration is not None and ((g + 1) % every == 0 or g + 1 == total):
        _promote(search, archive, calibration, len(x) * (g % every + 1), full_n)
        subset = calibration.subset()  # refitted: same items, so the same program
      if mngr is not None:
        with interrupts.deferred():  # Ctrl-C / SIGTERM: after the state is saved whole
          mngr.save(g + 1, args=ocp.args.StandardSave(_state_to_save(state, archive)))
          waits.call(mngr.wait_until_finished, "saving the search state", str(mngr.directory))
      bar.set_postfix(best=f"{np.nanmax(np.asarray(archive.fitness)):.2f}")
      if on_generation is not None:
        on_generation(g, archive)
  finally:
    bar.close()
