"""Merges that select entries, as mergekit 0.1.5 writes them: SCE (sce.py), NearSwap
(nearswap.py) and Arcee Fusion (arcee_fusion.py).

  SCE          keep the entries whose task vectors vary most across the models, weight
               each model by its task vector's energy, erase the entries that disagree in
               sign with the sum, add the weighted mean to the base.
  NearSwap     take the other model's entries where they are within t of the base, move
               the rest only t toward it.
  Arcee Fusion take the other model's entries whose importance (|change| x the row's KL
               divergence) is an outlier of the tensor (>= median + 1.5 IQR), keep the
               base's elsewhere.

mergekit's NearSwap and Arcee Fusion merge exactly one model into its base; the tree-level
methods here merge the pool's weighted average (alphas [N] on the simplex, or [G, N] per
layer group) into the base, which for a pool of one is mergekit's merge. SCE takes the
weights as a scale of each model's weight and vote: uniform ones give mergekit's merge.
Leaf kernels take float32 leaves; `kernels.map_merge` casts results to the stored dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.merging import kernels
from recycle_jax.merging.task_vectors import elect, ranks_ascending

PyTree = Any


# ----------------------------------------------------------------------------- SCE

def sce_leaf(base: jax.Array, xs: Sequence[jax.Array], weights=None,
             select_topk=1.0) -> jax.Array:
  """mergekit sce.py (Wan et al., FuseChat). Select: the floor(select_topk * nonzero)
  entries of largest variance of the task vectors over the models (`nonzero` counts the
  entries of non-zero variance; float32 product as torch's; ties broken by position; every
  entry at select_topk >= 1, none at <= 0). Calculate: each model's weight is its selected
  task vector's mean square, normalized (uniform when they sum under 1e-6). Erase: entries
  whose sign differs from the sum's (TIES' election; a zero sum counts positive). The base
  plus the weighted mean of what is left (divisor floored at 1e-6).
  weights [N] (alphas) scale each model's weight and vote; uniform ones (mergekit has
  none) give mergekit's merge."""
  n = len(xs)
  w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  tvs = jnp.stack([x - base for x in xs])  # [N, ...]
  var = jnp.var(tvs, axis=0)
  k = jnp.floor(jnp.sum(var != 0).astype(jnp.float32) * select_topk).astype(jnp.int32)
  topk = jnp.asarray(select_topk)
  keep = jnp.where(topk >= 1, True, (ranks_ascending(var) >= var.size - k) & (topk > 0))
  tvs = jnp.where(keep, tvs, 0.0)
  agree = jnp.stack(elect([w[j] * tvs[j] for j in range(n)], mergekit_rules=True))
  energy = jnp.mean(tvs.reshape(n, -1) ** 2, axis=1)
  scaled = w * energy
  total = jnp.sum(scaled)
  share = jnp.where(jnp.sum(energy) < 1e-6, w / jnp.sum(w),
                    scaled / jnp.where(total == 0, 1.0, total))
  kept = jnp.where(agree, share.reshape((n,) + (1,) * base.ndim), 0.0)
  return base + jnp.sum(tvs * kept, 0) / jnp.maximum(jnp.sum(kept, 0), 1e-6)


def sce(alphas, pool, base, select_topk=1.0) -> PyTree:
  """SCE of the pool against its base, tensor by tensor (alphas weight each model)."""
  return kernels.map_merge(lambda i, a, b, xs: sce_leaf(b, xs, a, select_topk), alphas,
                           pool, base)


# ----------------------------------------------------------------------------- NearSwap

def nearswap_leaf(base: jax.Array, x: jax.Array, t) -> jax.Array:
  """mergekit nearswap.py: each entry moves from the base toward x by the weight
  clip(t / |base - x|, 0, 1) (|base - x| floored at 1e-6): entries within t of the base
  are x's, farther ones move t toward it."""
  w = jnp.clip(t / jnp.maximum(jnp.abs(base - x), 1e-6), 0.0, 1.0)
  return w * x + (1 - w) * base


def nearswap(alphas, pool, base, nearswap_t=0.001) -> PyTree:
  """NearSwap of the pool's weighted average into the base, tensor by tensor
  (nearswap_t: mergekit's t)."""
  return kernels.map_merge(
      lambda i, a, b, xs: nearswap_leaf(b, kernels._wsum(a, xs), nearswap_t), alphas, pool,
      base)


# ----------------------------------------------------------------------------- Arcee Fusion

def fusion_importance(base: jax.Array, x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """|x - base| times KL(softmax(x) || softmax(base)) of its row (softmax over the last
  axis; a vector is one row), as mergekit's _compute_importance."""
  p = jax.nn.softmax(x, axis=-1) + eps
  q = jax.nn.softmax(base, axis=-1) + eps
  return jnp.abs(x - base) * jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)


def _quantile_index(q: float, n: int) -> int:
  """mergekit's (q * (n - 1)).long() for a float32 tensor q: a float32 product, truncated."""
  return int(np.float32(q) * np.float32(n - 1))


def arcee_fusion_leaf(base: jax.Array, x: jax.Array) -> jax.Array:
  """mergekit arcee_fusion.py: x's change where its importance reaches median + 1.5 IQR of
  the tensor's importances, the base elsewhere. Quantiles are the sorted importances at
  floor(q (n - 1)), as mergekit reads them for tensors of up to 10^6 entries; for larger
  ones mergekit reads a random sample of 10^6 (with replacement), recycle_jax all."""
  imp = fusion_importance(base, x)
  s = jnp.sort(imp.ravel())
  q1, med, q3 = (s[_quantile_index(q, s.size)] for q in (0.25, 0.5, 0.75))
  return base + (x - base) * (imp >= med + 1.5 * (q3 - q1))


def arcee_fusion(alphas, pool, base) -> PyTree:
  """Arcee Fusion of the pool's weighted average into the base, tensor by tensor."""
  return kernels.map_merge(lambda i, a, b, xs: arcee_fusion_leaf(b, kernels._wsum(a, xs)),
                           alphas, pool, base)
