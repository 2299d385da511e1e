"""What a search optimizes: a merge space over a registered merge method, and the weight
parametrizations that map the strategy's samples onto it.

Three names, one each: a strategy sample x (what evosax asks and is told, in R^dim), a
point w of the merge space (its weights on the simplex, then its tuned hyperparameters
within their bounds: `MergeSpace.decode(x)`), and per-checkpoint weights alphas [N]
(`MergeSpace.checkpoint_weights(w)`, what reports and figures show).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.merging import kernels, methods
from recycle_jax.runtime.errors import check
from recycle_jax.runtime.registry import Registry

PyTree = Any


# ----------------------------------------------------------------------------- parametrizations

def relu_normalize(x: jax.Array) -> jax.Array:
  """alpha = max(x, 0) / sum(max(x, 0)); all-zero -> uniform.

  x: [..., N]. Never NaN: the denominator is guarded before dividing.
  """
  r = jnp.maximum(x, 0.0)
  s = jnp.sum(r, axis=-1, keepdims=True)
  uniform = jnp.full_like(r, 1.0 / x.shape[-1])
  return jnp.where(s > 0, r / jnp.where(s > 0, s, 1.0), uniform)


def box(x: jax.Array) -> jax.Array:
  """The paper's: unnormalized weights in [0, 1] (x clipped to the box), divided by their
  sum; all-zero -> uniform. x: [..., N]."""
  return relu_normalize(jnp.clip(x, 0.0, 1.0))


def softmax(x: jax.Array) -> jax.Array:
  return jax.nn.softmax(x, axis=-1)


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """How a strategy sample's weight coordinates x [..., N] map onto the simplex.

  center: the x every coordinate starts at (it maps to uniform weights); sigma: the step
  size a search starts with when SearchConfig.sigma_init is None; encode: simplex weights
  [..., N] -> an x that maps back to them (to tell already evaluated points)."""
  name: str
  fn: Callable[[jax.Array], jax.Array]
  center: Callable[[int], float]
  sigma: float
  encode: Callable[[np.ndarray], np.ndarray] = lambda w: w

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


REGISTRY: Registry[Parametrization] = Registry("weight parametrization", "SearchConfig.parametrization")
for _p in (
    # With sigma 1 around 1/N, about half of every first-generation sample's coordinates
    # are negative, so zeroed: sparse merges (P(x < 0) = 0.48 at N = 16).
    Parametrization("relu_normalize", relu_normalize, lambda n: 1.0 / n, 1.0),
    Parametrization("softmax", softmax, lambda n: 0.0, 1.0,
                    lambda w: np.log(np.maximum(w, 1e-6)).astype(np.float32)),
    # The box's centre and Optuna's default step (range / 6): coordinates leave [0, 1]
    # rarely (P = 0.0013 each), so early samples use every checkpoint.
    Parametrization("box", box, lambda n: 0.5, 1.0 / 6.0),
):
  REGISTRY.register(_p)


get = REGISTRY.get


def bounded(x, lo: float, hi: float):
  return lo + (hi - lo) * jax.nn.sigmoid(x)


def unbounded(v, lo: float, hi: float) -> np.ndarray:
  p = np.clip((np.asarray(v, np.float64) - lo) / (hi - lo), 1e-3, 1 - 1e-3)
  return np.log(p / (1 - p))


# ----------------------------------------------------------------------------- spaces

@dataclasses.dataclass(frozen=True)
class MergeSpace:
  """A merge method, its weights (one vector, or one per layer group) and its tuned
  hyperparameters.

  A point is a flat vector w = [alphas (G*N, row-major, each row on the simplex), tuned
  hyperparameters in `tuned` order]; the strategy samples x of the same layout, mapped to w
  by the weight parametrization and the bounded transforms. Hashable (a jit cache key).
  """
  method: str = "linear"
  n: int = 1
  groups: tuple[str, ...] = ()  # layer groups; () = one weight vector for every leaf
  tuned: tuple[str, ...] = ()
  hparams: tuple[tuple[str, float], ...] = ()  # fixed values, or initial ones when tuned
  seed: int = 0  # a random method's key: fixed, so a candidate's fitness is not noisy

  @property
  def spec(self) -> methods.MergeMethod:
    return methods.get(self.method, "SearchConfig.merge_space")

  @property
  def name(self) -> str:
    if not self.groups:
      return self.method
    return "layerwise" if self.method == "linear" else f"layerwise_{self.method}"

  @property
  def num_weights(self) -> int:
    return max(1, len(self.groups)) * self.n

  @property
  def dim(self) -> int:
    return self.num_weights + len(self.tuned)

  @property
  def is_linear(self) -> bool:
    return self.method == "linear" and not self.groups

  def operands(self, params: Sequence[PyTree], base: PyTree | None) -> PyTree:
    """The 'pool' argument of `merge` and of the population function."""
    if not self.spec.needs_base:
      return tuple(params)
    self.spec.check_pool(len(params), base is not None)
    return tuple(params), base

  def unpack(self, w) -> tuple[jax.Array, dict]:
    """A point -> (weights [N] or [G, N], {hparam: value})."""
    a = w[:self.num_weights]
    alphas = a.reshape(len(self.groups), self.n) if self.groups else a
    hp = dict(self.hparams)
    hp.update({k: w[self.num_weights + j] for j, k in enumerate(self.tuned)})
    return alphas, hp

  def merge(self, w: jax.Array, operands: PyTree) -> PyTree:
    alphas, hp = self.unpack(w)
    params, base = operands if self.spec.needs_base else (operands, None)
    key = jax.random.key(self.seed) if self.spec.needs_key else None
    return self.spec(alphas, params, base, key, **hp)

  def merge_checked(self, w: jax.Array, operands: PyTree) -> tuple[PyTree, jax.Array]:
    """The merge and whether it is all finite, in one program."""
    merged = self.merge(w, operands)
    return merged, kernels.all_finite(merged)

  def _bounds(self, k: str) -> tuple[float, float]:
    return self.spec.hparam(k).bounds

  def decode(self, x: jax.Array, parametrize: Callable) -> jax.Array:
    """[..., dim] strategy samples x -> [..., dim] points w."""
    lead, g = x.shape[:-1], max(1, len(self.groups))
    a = parametrize(x[..., :self.num_weights].reshape(*lead, g, self.n))
    hs = [bounded(x[..., self.num_weights + j], *self._bounds(k))
          for j, k in enumerate(self.tuned)]
    return jnp.concatenate([a.reshape(*lead, self.num_weights)] +
                           [h[..., None] for h in hs], axis=-1)

  def encode(self, w: np.ndarray, param: Parametrization | None = None) -> np.ndarray:
    """Points w -> samples x that decode to them under `param` (default relu_normalize,
    where weights on the simplex are their own x); used to tell already evaluated points
    to the strategy."""
    w = np.asarray(w, np.float32)
    param = param or REGISTRY["relu_normalize"]
    hs = [unbounded(w[..., self.num_weights + j], *self._bounds(k))
          for j, k in enumerate(self.tuned)]
    return np.concatenate([param.encode(w[..., :self.num_weights])] +
                          [h[..., None] for h in hs], axis=-1).astype(np.float32)

  def lift(self, alphas: np.ndarray) -> np.ndarray:
    """Linear weights [K, N] -> points [K, dim] of this space that merge the same way
    (where the method has linear-equivalent hyperparameters; else the same weights)."""
    alphas = np.asarray(alphas, np.float32)
    tiled = np.tile(alphas, (1, max(1, len(self.groups))))
    lin = self.spec.linear_hparams()
    hs = np.full((len(alphas), len(self.tuned)), [lin[k] for k in self.tuned], np.float32)
    return np.concatenate([tiled, hs.reshape(len(alphas), -1)], axis=-1)

  def init_x(self, param: Parametrization | None = None) -> np.ndarray:
    """The strategy's initial mean: uniform weights (the parametrization's centre) and the
    configured hyperparameters."""
    param = param or REGISTRY["relu_normalize"]
    hs = np.asarray([dict(self.hparams)[k] for k in self.tuned], np.float32)
    x = self.encode(np.concatenate([np.full(self.num_weights, 1.0 / self.n, np.float32), hs]))
    x[:self.num_weights] = param.center(self.n)
    return x

  def checkpoint_weights(self, w: np.ndarray) -> np.ndarray:
    """Points [..., dim] -> per-checkpoint weights [..., N], averaged over the groups."""
    w = np.asarray(w)
    return w[..., :self.num_weights].reshape(*w.shape[:-1], -1, self.n).mean(-2)

  def describe(self, w: np.ndarray) -> dict:
    """A point as JSON: the space, its weights per group and its hyperparameters."""
    alphas, hp = self.unpack(np.asarray(w, np.float64))
    out = {"merge_space": self.name, "method": self.method,
           "hparams": {k: round(float(v), 6) for k, v in hp.items()}}
    if self.groups:
      out["groups"] = list(self.groups)
      out["group_weights"] = np.round(alphas, 6).tolist()
    return out


def space_names() -> tuple[str, ...]:
  """Every method, 'layerwise' (linear per layer group) and 'layerwise_<method>'."""
  nonlinear = tuple(m for m in methods.REGISTRY if m != "linear")
  return tuple(methods.REGISTRY) + ("layerwise",) + tuple(f"layerwise_{m}" for m in nonlinear)


def parse_space(name: str) -> tuple[str, bool]:
  """'layerwise_ties' -> ('ties', True); 'layerwise' -> ('linear', True)."""
  names = space_names()
  check(name in names, f"unknown merge space {name!r}", "SearchConfig.merge_space",
        f"choose from {list(names)}")
  return name.removeprefix("layerwise").removeprefix("_") or "linear", name.startswith("layerwise")


def make_space(name: str, tree: PyTree, n: int, tune: bool = True, seed: int = 0,
               **values: float) -> MergeSpace:
  """'linear' | 'layerwise' | a registered method | 'layerwise_<method>'.

  tree: one parameter tree of the pool (its paths give the layer groups).
  values: hyperparameters (lam=, density=, ...) overriding the registry's defaults; tune:
  search the method's hyperparameters too, starting from those values; otherwise they stay
  fixed at them.
  """
  method, layerwise = parse_space(name)
  known = methods.hparams_by_name()
  for k in values:
    check(k in known, f"unknown merge hyperparameter {k!r}", "make_space",
          f"choose from {sorted(known)}")
  spec = methods.get(method, "SearchConfig.merge_space")
  spec.check_pool(n, True)  # the base is checked where it is given
  names = spec.hparam_names
  hp = tuple((h.name, float(values.get(h.name, h.default))) for h in spec.hparams)
  return MergeSpace(method, n, kernels.layer_groups(tree)[0] if layerwise else (),
                    names if tune else (), hp, seed)
