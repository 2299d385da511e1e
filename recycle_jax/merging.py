"""Merging a pool of parameter trees, and the weight parametrizations searched over.

The pool is a tuple of N parameter trees with identical structure (no stacked pool
axis: each leaf keeps the sharding of its own parameter, and the merge is one fused
elementwise pass reading N inputs). Accumulation is float32; results are cast back to
the stored dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.errors import check

PyTree = Any
Pool = Sequence[PyTree]


# ----------------------------------------------------------------------------- weights

def relu_normalize(x: jax.Array) -> jax.Array:
  """The paper's parametrization: alpha = max(x, 0) / sum(max(x, 0)); all-zero -> uniform.

  x: [..., N]. Never NaN: the denominator is guarded before dividing.
  """
  r = jnp.maximum(x, 0.0)
  s = jnp.sum(r, axis=-1, keepdims=True)
  uniform = jnp.full_like(r, 1.0 / x.shape[-1])
  return jnp.where(s > 0, r / jnp.where(s > 0, s, 1.0), uniform)


def softmax(x: jax.Array) -> jax.Array:
  return jax.nn.softmax(x, axis=-1)


PARAMETRIZATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu_normalize": relu_normalize,
    "softmax": softmax,
}


def get_parametrization(name: str) -> Callable[[jax.Array], jax.Array]:
  check(name in PARAMETRIZATIONS, f"unknown weight parametrization {name!r}",
        "search.parametrization", f"choose from {sorted(PARAMETRIZATIONS)}")
  return PARAMETRIZATIONS[name]


def check_explicit_weights(weights: Sequence[float], n: int, flag: str = "--weights"
                           ) -> np.ndarray:
  """User-given weights: N of them, non-negative, not all zero; returned normalized."""
  w = np.asarray(weights, np.float64)
  check(w.shape == (n,), f"got {w.size} weights for a pool of {n} checkpoints", flag,
        f"pass exactly {n} comma-separated weights")
  check(bool(np.all(np.isfinite(w))), "weights must be finite numbers", flag)
  check(bool(np.all(w >= 0)), f"negative weight {w.min():g}", flag,
        "linear merging needs weights >= 0")
  check(w.sum() > 0, "all weights are zero", flag, "give at least one positive weight")
  return w / w.sum()


# ----------------------------------------------------------------------------- merges

def linear(alphas: jax.Array, pool: Pool) -> PyTree:
  """sum_i alphas[i] * pool[i], leaf by leaf. alphas: [N]."""
  def leaf(*xs):
    acc = sum(alphas[i] * x.astype(jnp.float32) for i, x in enumerate(xs))
    return acc.astype(xs[0].dtype)
  return jax.tree.map(leaf, *pool)


def linear_population(alphas: jax.Array, pool: Pool) -> PyTree:
  """alphas: [P, N] -> trees with a leading population axis [P, ...]."""
  return jax.vmap(linear, in_axes=(0, None))(alphas, pool)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool; fused into the merge that produced `tree`, so no extra pass over data."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def linear_checked(alphas: jax.Array, pool: Pool) -> tuple[PyTree, jax.Array]:
  """The linear merge and whether it is all finite, in one pass over the data."""
  merged = linear(alphas, pool)
  return merged, all_finite(merged)


@gin.configurable
def merge(method: str, alphas: jax.Array, pool: Pool, base: PyTree | None = None,
          **hparams) -> PyTree:
  """Dispatch to a merge method by name (linear unless configured otherwise)."""
  fn = METHODS.get(method)
  check(fn is not None, f"unknown merge method {method!r}", "--method",
        f"choose from {sorted(METHODS)}")
  return fn(alphas, pool, base=base, **hparams)


METHODS: dict[str, Callable[..., PyTree]] = {
    "linear": lambda alphas, pool, base=None: linear(alphas, pool),
}
