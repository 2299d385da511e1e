"""The merge methods as one registry: a record per method (evosax's algorithm dicts are the
pattern), from which everything else is derived: the CLI's `--method` choices and flags,
the task-vector baselines, the report's row order, the figures' markers, the search spaces
and whether a base checkpoint is needed.

Adding a method is one kernel (in `kernels`, `task_vectors`, `geometric` or `selection`) and one
`MergeMethod` entry below (or `register(...)` from another module);
tests/test_methods_registry.py covers it for free.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from recycle_jax.merging import geometric, kernels, selection, task_vectors
from recycle_jax.runtime.errors import check
from recycle_jax.runtime.registry import Registry

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Hparam:
  """A method's scalar hyperparameter."""
  name: str
  default: float
  bounds: tuple[float, float]  # searched within these (a sigmoid maps R onto them)
  linear: float | None = None  # the value at which the method reproduces the linear merge
  #                              (exactly, or for TIES without trimming); None: none
  valid: tuple[float, float] = (float("-inf"), float("inf"))  # lo < value <= hi when given
  help: str = ""


@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """fn(alphas [N] or [G, N], pool, [base], [key], **hparams) -> merged tree."""
  name: str
  fn: Callable[..., PyTree]
  hparams: tuple[Hparam, ...] = ()  # in search-vector order
  needs_base: bool = False  # task vectors against the checkpoint the pool came from
  needs_key: bool = False  # random (DARE's drop): a fixed key per space, so fitness is exact
  marker: str | None = None  # matplotlib marker in the figures; None: never drawn apart
  baseline: bool = False  # scored as a baseline: uniform weights, hparams chosen on dev
  negative_weights: bool = False  # explicit weights may be negative (task negation)
  num_models: int | None = None  # a pool of exactly this many checkpoints (SLERP: 2)
  members: bool = True  # one-hot weights at the linear hparams give that checkpoint (model
  #                       stock: no, its pull toward the base comes from the angles)
  doc: str = ""

  @property
  def hparam_names(self) -> tuple[str, ...]:
    return tuple(h.name for h in self.hparams)

  @property
  def is_linear(self) -> bool:
    return self.name == "linear"

  def hparam(self, name: str) -> Hparam:
    return {h.name: h for h in self.hparams}[name]

  def linear_hparams(self) -> dict[str, float]:
    """The hyperparameters at which the method merges like the linear merge (where any)."""
    return {h.name: h.default if h.linear is None else h.linear for h in self.hparams}

  def check_pool(self, n: int, has_base: bool, where: str = "--base / Experiment.base"
                 ) -> None:
    check(self.num_models is None or n == self.num_models, f"merge method {self.name!r} "
          f"merges {self.num_models} checkpoints, the pool has {n}", "--pool / Experiment.pool",
          f"give a pool of {self.num_models} checkpoints")
    check(has_base or not self.needs_base, f"merge method {self.name!r} needs the base "
          "checkpoint the pool was fine-tuned from", where, "pass the base checkpoint's path")

  def applies_to(self, n: int, has_base: bool) -> bool:
    return (self.num_models is None or n == self.num_models) and (has_base or
                                                                    not self.needs_base)

  def __call__(self, alphas, pool, base: PyTree | None = None, key: jax.Array | None = None,
               **hparams) -> PyTree:
    self.check_pool(len(pool), base is not None)
    args = [alphas, pool] + [base] * self.needs_base
    args += [jax.random.key(0) if key is None else key] * self.needs_key
    return self.fn(*args, **hparams)


LAM = Hparam("lam", 1.0, (0.0, 4.0), linear=1.0,
             help="scale of the weighted task vector (lam = N sums task vectors)")
DENSITY = Hparam("density", 0.5, (0.05, 1.0), linear=1.0, valid=(0.0, 1.0),
                 help="TIES/DARE/breadcrumbs/DELLA fraction kept")
GAMMA = Hparam("gamma", 0.01, (0.001, 0.1), linear=0.01, valid=(0.0, 0.5),
               help="breadcrumbs: fraction of largest-magnitude entries dropped (outliers)")
EPSILON = Hparam("epsilon", 0.1, (0.01, 0.2), linear=0.1, valid=(0.0, 0.5),
                 help="DELLA: keep probabilities span density +- epsilon by magnitude rank")
SELECT_TOPK = Hparam("select_topk", 1.0, (0.05, 1.0), linear=1.0, valid=(0.0, 1.0),
                     help="SCE: fraction of entries kept, those of most variance across models")
NEARSWAP_T = Hparam("nearswap_t", 0.001, (1e-5, 0.05), valid=(0.0, float("inf")),
                    help="NearSwap: entries within this distance of the base are swapped in "
                         "whole, farther ones move this far (mergekit's t)")

REGISTRY: Registry[MergeMethod] = Registry("merge method", "--method")
register = REGISTRY.register
get = REGISTRY.get


for _m in (
    MergeMethod("linear", kernels.weighted, doc="sum_i alphas_i pool_i"),
    MergeMethod("task_arithmetic", kernels.task_arithmetic, (LAM,), needs_base=True,
                marker="v", baseline=True, negative_weights=True, doc="base + lam sum_i alphas_i (pool_i - base)"),
    MergeMethod("ties", kernels.ties, (LAM, DENSITY), needs_base=True, marker="^",
                baseline=True, negative_weights=True, doc="trim, elect signs, disjoint mean"),
    MergeMethod("dare_linear", kernels.dare_linear, (LAM, DENSITY), needs_base=True,
                needs_key=True, marker="<", baseline=True, negative_weights=True,
                doc="random drop and rescale, then task arithmetic"),
    MergeMethod("dare_ties", kernels.dare_ties, (LAM, DENSITY), needs_base=True,
                needs_key=True, marker=">", baseline=True, negative_weights=True,
                doc="random drop and rescale, then TIES' election"),
    MergeMethod("slerp", kernels.slerp, marker="h", num_models=2,
                doc="spherical interpolation of 2 checkpoints, weights (1 - t, t)"),
    MergeMethod("breadcrumbs", task_vectors.breadcrumbs, (LAM, DENSITY, GAMMA),
                needs_base=True, negative_weights=True,
                doc="task vectors without their largest and smallest entries, summed"),
    MergeMethod("breadcrumbs_ties", task_vectors.breadcrumbs_ties, (LAM, DENSITY, GAMMA),
                needs_base=True, negative_weights=True,
                doc="breadcrumbs' band, then TIES' election"),
    MergeMethod("della", task_vectors.della, (LAM, DENSITY, EPSILON), needs_base=True,
                needs_key=True, negative_weights=True,
                doc="drop by magnitude rank (MAGPRUNE), rescale, then TIES' election"),
    MergeMethod("della_linear", task_vectors.della_linear, (LAM, DENSITY, EPSILON),
                needs_base=True, needs_key=True, negative_weights=True,
                doc="MAGPRUNE, then task arithmetic"),
    MergeMethod("multislerp", geometric.multislerp,
                doc="barycentric interpolation on the hypersphere (tangent space)"),
    MergeMethod("nuslerp", geometric.nuslerp, num_models=2,
                doc="SLERP of 2 checkpoints, t = alpha_2 / (alpha_1 + alpha_2)"),
    MergeMethod("karcher", geometric.karcher,
                doc="weighted Riemannian (Karcher) mean of the directions, mean norm"),
    MergeMethod("model_stock", geometric.model_stock, needs_base=True, members=False,
                doc="average pulled toward the base by the task vectors' mean angle"),
    MergeMethod("sce", selection.sce, (SELECT_TOPK,), needs_base=True,
                doc="select entries by variance, weight models by energy, erase sign "
                    "conflicts"),
    MergeMethod("nearswap", selection.nearswap, (NEARSWAP_T,), needs_base=True,
                members=False, doc="the base, with the average's entries near it swapped in"),
    MergeMethod("arcee_fusion", selection.arcee_fusion, needs_base=True, members=False,
                doc="the base, with the average's changes of outlying importance"),
):
  register(_m)


def merge(method: str, alphas: jax.Array, pool, base: PyTree | None = None,
          key: jax.Array | None = None, **hparams) -> PyTree:
  """Dispatch to a merge method by name. alphas [N], or [G, N] for one weight vector per
  layer group; hparams: the method's (lam, density, ...)."""
  return get(method)(alphas, pool, base, key, **hparams)


def baseline_methods() -> tuple[str, ...]:
  """The methods scored as baselines (when their operands are there), registry order."""
  return tuple(m.name for m in REGISTRY.values() if m.baseline)


def hparams_by_name() -> dict[str, Hparam]:
  """Every hyperparameter of the registry by name (a name means one thing everywhere)."""
  out: dict[str, Hparam] = {}
  for m in REGISTRY.values():
    for h in m.hparams:
      check(out.setdefault(h.name, h) == h, f"hyperparameter {h.name!r} defined twice "
            "differently", f"methods.REGISTRY[{m.name!r}]")
  return out
