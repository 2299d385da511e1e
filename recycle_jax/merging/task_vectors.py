"""Task-vector merges with every sparsification rule: mergekit's generalized task arithmetic.

One leaf kernel, `combine`, serves every method that sparsifies each task vector
(pool_i - base), optionally elects signs TIES-style, and adds the weighted combination back
to the base:

    base + lam * sum_i w_i sparsify(pool_i - base) [ * sign mask ] [ / normalizer ]

The rules (`SPARSIFY`): TIES' magnitude trim, DARE's random drop, Model Breadcrumbs'
magnitude band (drop the smallest and the gamma largest), DELLA's magnitude-ranked random
drop (MAGPRUNE), as in mergekit 0.1.5. Two conventions exist for trimming and rescaling, and `mergekit_rules`
chooses:
  - recycle_jax's (the default, the papers' code): TIES keeps round(density * size) entries
    and every entry tied with the k-th magnitude; DARE rescales kept entries by 1 / density
    and DELLA by 1 / p_i, each entry's own keep probability (unbiased in expectation).
  - mergekit's (used when a mergekit config is given, so its results are reproduced):
    exactly k = max(1, floor(density * size)) entries kept (ties broken by position), random
    drops rescaled, when `rescale` is on, so the tensor keeps its L1 norm; the sign
    election counts a zero weighted sum as positive.
Weights may be negative (task negation: mergekit's `weight: -1`).

Leaf kernels take float32 leaves; `kernels.map_merge` casts results to the stored dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from recycle_jax.merging import kernels

PyTree = Any


# ----------------------------------------------------------------------------- helpers

def floor_count(fraction, size: int, exact=None):
  """floor(fraction * size), as mergekit's int(): `exact` when the caller computed it on
  the host (float64, as mergekit does: float32 cannot count past 2^24, nor floor 0.7 * 10
  to 7), exact for a Python number, traced float32 otherwise (searched values)."""
  if exact is not None:
    return exact
  if isinstance(fraction, (int, float)):
    return int(fraction * size)
  return jnp.floor(fraction * size).astype(jnp.int32)


def host_counts(density: float, gamma: float, size: int) -> tuple[int, int]:
  """(floor(density * size), floor(gamma * size)) in float64, for `combine(counts=...)`."""
  return int(density * size), int(gamma * size)


def ranks_ascending(mag: jax.Array) -> jax.Array:
  """Each entry's position in the stable ascending order of `mag` (flattened): 0 = smallest;
  equal magnitudes are ranked by position (a deterministic tie rule)."""
  flat = mag.ravel()
  order = jnp.argsort(flat, stable=True)
  return jnp.zeros(flat.shape, jnp.int32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.int32)).reshape(mag.shape)


def rescale_l1(tv: jax.Array, kept: jax.Array, eps: float = 1e-7) -> jax.Array:
  """mergekit's RescaleNorm.l1: scale the kept entries so the tensor keeps its L1 norm
  (unchanged when either norm is under eps)."""
  masked = jnp.where(kept, tv, 0.0)
  before, after = jnp.sum(jnp.abs(tv)), jnp.sum(jnp.abs(masked))
  ok = (before >= eps) & (after >= eps)
  return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def _finish(tv, kept, rescale, dense):
  """Apply the mask (rescaled or not); a `dense` tensor (density >= 1) is left unchanged."""
  out = rescale_l1(tv, kept) if rescale else jnp.where(kept, tv, 0.0)
  return jnp.where(dense, tv, out)


# ----------------------------------------------------------------------------- rules
# Each rule: (tv, density, key, mergekit_rules, rescale, gamma, epsilon, counts) -> sparse
# tv; counts: None, or host_counts' (kept, outliers) for exact counts.

def magnitude(tv, density, key, mergekit_rules, rescale, gamma, epsilon, counts=None):
  """TIES' trim: keep the largest-magnitude entries (mergekit: at least one when
  density > 0)."""
  if not mergekit_rules:
    return kernels.trim_magnitude(tv, density)
  k = jnp.maximum(floor_count(density, tv.size, None if counts is None else counts[0]), 1)
  kept = (ranks_ascending(jnp.abs(tv)) >= tv.size - k) & (jnp.asarray(density) > 0)
  return _finish(tv, kept, rescale, jnp.asarray(density) >= 1)


def random(tv, density, key, mergekit_rules, rescale, gamma, epsilon, counts=None):
  """DARE: keep each entry with probability density."""
  if not mergekit_rules:
    return kernels.dare_drop(tv, density, key)
  kept = jax.random.uniform(key, tv.shape) < density
  return _finish(tv, kept, rescale, jnp.asarray(density) >= 1)


def magnitude_outliers(tv, density, key, mergekit_rules, rescale, gamma, epsilon, counts=None):
  """Model Breadcrumbs: keep floor(density * size) entries, the band of magnitudes just
  below the floor(gamma * size) largest (outliers); fewer outliers are dropped when both
  do not fit. The same rule under both conventions."""
  size = tv.size
  target, n_top = (floor_count(density, size), floor_count(gamma, size)) if counts is None \
      else counts
  n_bot = jnp.maximum(size - target - n_top, 0)
  r = ranks_ascending(jnp.abs(tv))
  kept = (r >= n_bot) & (r < n_bot + target)
  return _finish(tv, kept, rescale, jnp.asarray(density) >= 1)


def della_magprune(tv, density, key, mergekit_rules, rescale, gamma, epsilon, counts=None):
  """DELLA's MAGPRUNE: per row (a vector is one row), entries ranked by magnitude are kept
  with probability p = density - epsilon + 2 epsilon (rank / (cols - 1)), so larger ones
  survive more often. Rescaled by 1 / p (the paper) or, under mergekit's rules when
  `rescale` is on, to the tensor's L1 norm. p is clipped to [0, 1] (mergekit refuses
  density +- epsilon outside (0, 1); the mergekit config check does too)."""
  rows = tv.reshape(1, -1) if tv.ndim < 2 else tv
  cols = rows.shape[-1]
  order = jnp.argsort(jnp.abs(rows), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True).astype(jnp.float32)  # 0 .. cols - 1
  p = jnp.clip(density - epsilon + 2 * epsilon * rank / max(cols - 1, 1), 0.0, 1.0)
  p = p.reshape(tv.shape)
  kept = jax.random.uniform(key, tv.shape) < p
  if mergekit_rules:
    out = _finish(tv, kept, rescale, jnp.asarray(density) >= 1)
  else:
    out = jnp.where(jnp.asarray(density) >= 1, tv, jnp.where(kept, tv / jnp.where(kept, p, 1.0),
                                                              0.0))
  return jnp.where(jnp.asarray(density) <= 0, 0.0, out)


SPARSIFY: dict[str, Callable[..., jax.Array]] = {
    "magnitude": magnitude, "random": random, "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune}


# ----------------------------------------------------------------------------- combination

def elect(weighted: Sequence[jax.Array], mergekit_rules: bool) -> list[jax.Array]:
  """TIES' sign election over weighted task vectors w_i tv_i: per entry, those agreeing with
  the sign of their sum (a zero sum elects no sign; mergekit's rule counts it positive)."""
  total = sum(weighted)
  sign = jnp.where(total >= 0, 1.0, -1.0) if mergekit_rules else jnp.sign(total)
  return [jnp.sign(t) == sign for t in weighted]


def combine(base: jax.Array, xs: Sequence[jax.Array], weights, lam=1.0, *,
            sparsify: str | None = None, density=1.0, consensus: bool = False,
            normalize: bool = True, mergekit_rules: bool = False, rescale: bool = False,
            gamma=0.01, epsilon=0.15, key: jax.Array | None = None,
            counts: jax.Array | None = None) -> jax.Array:
  """One leaf of a task-vector merge, float32.

  base, xs[i]: [...] leaves; weights: [N] (any sign); density, gamma, epsilon: scalars or
  [N] (per checkpoint); key: for the random rules (one stream per checkpoint); counts:
  [N, 2] int32 host_counts per checkpoint (mergekit's exact trims), or None.
  normalize divides by the sum of the weights (with consensus: of the agreeing weights; a
  zero divisor leaves the sum as it is, as mergekit does).
  """
  n = len(xs)
  per = lambda v, j: v[j] if jnp.ndim(v) else v
  tvs = [x - base for x in xs]
  if sparsify is not None:
    rule = SPARSIFY[sparsify]
    tvs = [rule(t, per(density, j), None if key is None else jax.random.fold_in(key, j),
                mergekit_rules, rescale, per(gamma, j), per(epsilon, j),
                None if counts is None else (counts[j, 0], counts[j, 1]))
           for j, t in enumerate(tvs)]
  weighted = [weights[j] * t for j, t in enumerate(tvs)]
  if consensus:
    agree = elect(weighted, mergekit_rules)
    mixed = sum(jnp.where(m, t, 0.0) for m, t in zip(agree, weighted))
    divisor = sum(jnp.where(m, weights[j], 0.0) for j, m in enumerate(agree))
    divisor = jnp.where(divisor == 0, 1.0, divisor)
  else:
    mixed = sum(weighted)
    divisor = sum(weights[j] for j in range(n))
    divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
  if normalize:
    mixed = mixed / divisor
  return base + lam * mixed


def merge_tree(alphas, pool, base: PyTree, lam=1.0, key: jax.Array | None = None,
               **options) -> PyTree:
  """`combine` over a pool, leaf by leaf (alphas [N] or [G, N] per layer group); random
  rules draw from fold_in(fold_in(key, leaf index), checkpoint), as merging's DARE does."""
  def leaf(i, a, b, xs):
    k = None if key is None else jax.random.fold_in(key, i)
    return combine(b, xs, a, lam, key=k, **options)
  return kernels.map_merge(leaf, alphas, pool, base)


# ----------------------------------------------------------------------------- methods
# recycle_jax's conventions: alphas on the simplex (normalize is then a no-op), lam scales.

def breadcrumbs(alphas, pool, base, lam=1.0, density=0.5, gamma=0.01) -> PyTree:
  """Davari & Belilovsky: each task vector keeps a band of magnitudes (no outliers, no
  small ones), then task arithmetic."""
  return merge_tree(alphas, pool, base, lam, sparsify="magnitude_outliers", density=density,
                    gamma=gamma)


def breadcrumbs_ties(alphas, pool, base, lam=1.0, density=0.5, gamma=0.01) -> PyTree:
  """Breadcrumbs' band, then TIES' sign election and disjoint mean."""
  return merge_tree(alphas, pool, base, lam, sparsify="magnitude_outliers", density=density,
                    gamma=gamma, consensus=True)


def della(alphas, pool, base, key, lam=1.0, density=0.5, epsilon=0.1) -> PyTree:
  """Deep et al.: MAGPRUNE (magnitude-ranked keep probabilities, rescaled by 1 / p), then
  TIES' sign election and disjoint mean."""
  return merge_tree(alphas, pool, base, lam, key, sparsify="della_magprune",
                    density=density, epsilon=epsilon, consensus=True)


def della_linear(alphas, pool, base, key, lam=1.0, density=0.5, epsilon=0.1) -> PyTree:
  """MAGPRUNE, then task arithmetic."""
  return merge_tree(alphas, pool, base, lam, key, sparsify="della_magprune",
                    density=density, epsilon=epsilon)


def check_della(density: float, epsilon: float) -> bool:
  """mergekit's condition: density +- epsilon inside (0, 1) (or density >= 1: no drop)."""
  return density >= 1 or (0 < density - epsilon and density + epsilon < 1)

