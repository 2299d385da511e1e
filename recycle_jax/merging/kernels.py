"""Merge kernels over a pool of parameter trees, and the soups.

The pool is a tuple of N parameter trees with identical structure (no stacked pool
axis: each leaf keeps the sharding of its own parameter, and the merge is one fused
elementwise pass reading N inputs). Accumulation is float32; results are cast back to
the stored dtype.

Beside the linear merge: layer-wise linear merging (one weight vector per layer group),
task-vector methods against the base checkpoint (task arithmetic, TIES, DARE), SLERP of two
checkpoints and the greedy soup. `methods` holds the registry of merge methods built on
these kernels; `spaces` what a search optimizes over them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.runtime.errors import check
from recycle_jax.models.partitioning import path_str

PyTree = Any
Pool = Sequence[PyTree]


# ----------------------------------------------------------------------------- weights

def check_explicit_weights(weights: Sequence[float], n: int, flag: str = "--weights",
                           allow_negative: bool = False) -> np.ndarray:
  """User-given weights: N of them, non-negative unless the method allows it, summing to a
  positive value; returned normalized."""
  w = np.asarray(weights, np.float64)
  check(w.shape == (n,), f"got {w.size} weights for a pool of {n} checkpoints", flag,
        f"pass exactly {n} comma-separated weights")
  check(bool(np.all(np.isfinite(w))), "weights must be finite numbers", flag)
  check(allow_negative or bool(np.all(w >= 0)), f"negative weight {w.min():g}", flag,
        "this merge method needs weights >= 0")
  check(w.sum() > 0, "the weights sum to zero or less" if allow_negative else
        "all weights are zero", flag, "give at least one positive weight")
  return w / w.sum()


# ----------------------------------------------------------------------------- merges

def linear(alphas: jax.Array, pool: Pool) -> PyTree:
  """sum_i alphas[i] * pool[i], leaf by leaf. alphas: [N]."""
  def leaf(*xs):
    acc = sum(alphas[i] * x.astype(jnp.float32) for i, x in enumerate(xs))
    return acc.astype(xs[0].dtype)
  return jax.tree.map(leaf, *pool)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool; fused into the merge that produced `tree`, so no extra pass over data."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.jit
def _accumulate(acc: PyTree, alpha: jax.Array, params: PyTree) -> PyTree:
  return jax.tree.map(lambda s, x: s + alpha * x.astype(jnp.float32), acc, params)


@jax.jit
def _finish(acc: PyTree, like: PyTree) -> tuple[PyTree, jax.Array]:
  merged = jax.tree.map(lambda s, x: s.astype(x.dtype), acc, like)
  return merged, all_finite(merged)


def linear_accumulated(alphas, pool: Pool) -> tuple[PyTree, jax.Array]:
  """`linear` and whether it is all finite, one member at a time: two programs of the
  model's size whatever N (one program over N trees compiles an N x leaves graph, whose
  memory and time grow with N: 12.8 GB and 122 s for 1,000 small members). The same sum
  in the same order (equal up to float32 rounding where XLA fuses the one program's
  multiply-adds). alphas: [N]."""
  acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32, device=x.sharding), pool[0])
  for a, params in zip(np.asarray(alphas, np.float32), pool):
    acc = _accumulate(acc, a, params)
  return _finish(acc, pool[0])


# ----------------------------------------------------------------------------- layer groups

def group_name(path) -> str:
  """A parameter's weight group: its top-level module. The output norm and an untied head
  form one 'final' group (both act only on the last hidden state)."""
  top = path_str(path).split("/")[0]
  return "final" if top in ("final_norm", "lm_head") else top


def _group_order(name: str) -> tuple:
  layer = re.fullmatch(r"layer_(\d+)", name)
  rank = 0 if name == "embed" else 1 if layer else 3 if name == "final" else 2
  return rank, int(layer[1]) if layer else 0, name


def layer_groups(tree: PyTree) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(group names in model order: embed, layer_0.., final; group index of every leaf)."""
  names = [group_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  order = tuple(sorted(set(names), key=_group_order))
  return order, tuple(order.index(n) for n in names)


# ----------------------------------------------------------------------------- merge methods

def _wsum(alphas: jax.Array, xs: Sequence[jax.Array]) -> jax.Array:
  return sum(alphas[i] * x for i, x in enumerate(xs))


def map_merge(leaf_fn: Callable, alphas, pool: Pool, base: PyTree | None = None) -> PyTree:
  """leaf_fn(leaf index, alphas row [N], base leaf | None, pool leaves) per leaf, in float32.

  alphas [N] serve every leaf; alphas [G, N] give each layer group (layer_groups) its row.
  """
  alphas = jnp.asarray(alphas)
  leaves, treedef = jax.tree.flatten(pool[0])
  cols = [treedef.flatten_up_to(p) for p in pool]
  bases = treedef.flatten_up_to(base) if base is not None else [None] * len(leaves)
  if alphas.ndim == 2:
    names, gid = layer_groups(pool[0])
    check(alphas.shape[0] == len(names), f"{alphas.shape[0]} weight rows for "
          f"{len(names)} layer groups {list(names)}", "--weights", "give one row per group")
  out = []
  for i, leaf in enumerate(leaves):
    row = alphas if alphas.ndim == 1 else alphas[gid[i]]
    b = None if bases[i] is None else bases[i].astype(jnp.float32)
    merged = leaf_fn(i, row, b, [c[i].astype(jnp.float32) for c in cols])
    out.append(merged.astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def layerwise(alphas: jax.Array, pool: Pool) -> PyTree:
  """Linear merge with one weight vector per layer group. alphas: [G, N]."""
  return map_merge(lambda i, a, b, xs: _wsum(a, xs), alphas, pool)


def trim_magnitude(tv: jax.Array, density) -> jax.Array:
  """TIES 'trim': keep the round(density * size) largest-magnitude entries of a tensor.

  density may be traced (searched): the threshold is read from the sorted magnitudes at a
  dynamic index; ties at the threshold are all kept.
  """
  mag = jnp.abs(tv)
  size = tv.size
  k = jnp.clip(jnp.round(density * size).astype(jnp.int32), 0, size)
  kth = jnp.sort(mag.ravel())[jnp.clip(size - k, 0, size - 1)]
  return jnp.where((k > 0) & (mag >= kth), tv, 0.0)


def dare_drop(tv: jax.Array, density, key: jax.Array) -> jax.Array:
  """DARE: drop each entry with probability 1 - density, rescale the rest by 1 / density.

  One uniform draw per entry, compared with density: candidates with different densities
  share the key, so their masks are nested rather than independent noise.
  """
  keep = jax.random.uniform(key, tv.shape) < density
  return jnp.where(keep, tv / density, 0.0)


def disjoint_merge(alphas: jax.Array, tvs: Sequence[jax.Array]) -> jax.Array:
  """TIES sign election and disjoint mean: per entry, the sign of the weighted sum wins and
  only the task vectors agreeing with it are averaged (with their weights)."""
  sign = jnp.sign(_wsum(alphas, tvs))
  agree = [(jnp.sign(t) == sign) & (t != 0) for t in tvs]
  num = _wsum(alphas, [jnp.where(m, t, 0.0) for m, t in zip(agree, tvs)])
  den = _wsum(alphas, [m.astype(jnp.float32) for m in agree])
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _task_vectors(alphas, pool: Pool, base: PyTree, lam, density=1.0, sparsify=None,
                  elect=False, key=None) -> PyTree:
  """base + lam * combine(sparsify(pool[i] - base)), leaf by leaf."""
  def leaf(i, a, b, xs):
    tvs = [x - b for x in xs]
    if sparsify == "magnitude":
      tvs = [trim_magnitude(t, density) for t in tvs]
    elif sparsify == "random":  # an independent mask per leaf and per checkpoint
      k = jax.random.fold_in(key, i)
      tvs = [dare_drop(t, density, jax.random.fold_in(k, j)) for j, t in enumerate(tvs)]
    return b + lam * (disjoint_merge(a, tvs) if elect else _wsum(a, tvs))
  return map_merge(leaf, alphas, pool, base)


def task_arithmetic(alphas, pool: Pool, base: PyTree, lam=1.0) -> PyTree:
  """Ilharco et al.: base + lam * sum_i alphas_i (pool_i - base). With alphas on the
  simplex, lam = 1 is the linear merge and lam = N sums the task vectors."""
  return _task_vectors(alphas, pool, base, lam)


def ties(alphas, pool: Pool, base: PyTree, lam=1.0, density=0.5) -> PyTree:
  """Yadav et al.: trim each task vector to its top-density magnitudes (per tensor), elect
  signs, disjoint mean."""
  return _task_vectors(alphas, pool, base, lam, density, "magnitude", elect=True)


def dare_linear(alphas, pool: Pool, base: PyTree, key: jax.Array, lam=1.0,
                density=0.5) -> PyTree:
  """Yu et al.: random drop-and-rescale of each task vector, then task arithmetic."""
  return _task_vectors(alphas, pool, base, lam, density, "random", key=key)


def dare_ties(alphas, pool: Pool, base: PyTree, key: jax.Array, lam=1.0,
              density=0.5) -> PyTree:
  """DARE's random drop, then TIES sign election and disjoint mean."""
  return _task_vectors(alphas, pool, base, lam, density, "random", elect=True, key=key)


def weighted(alphas: jax.Array, pool: Pool) -> PyTree:
  """The linear merge: alphas [N] for every leaf (`linear`), or [G, N] (`layerwise`)."""
  return (linear if jnp.ndim(alphas) == 1 else layerwise)(alphas, pool)


def slerp_tensors(t, v0: jax.Array, v1: jax.Array, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> jax.Array:
  """mergekit's `slerp`: spherical interpolation from v0 (t = 0) to v1 (t = 1) along the
  great circle through their directions, the tensors taken whole; linear interpolation when
  they are nearly colinear (|cos| > dot_threshold), where the sine below vanishes."""
  n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
  u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)  # mergekit normalizes only
  u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)  # norms above eps
  dot = jnp.sum(u0 * u1)
  colinear = jnp.abs(dot) > dot_threshold
  theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin = jnp.where(colinear, 1.0, jnp.sin(theta))  # the spherical branch is discarded there
  s0, s1 = jnp.sin(theta - theta * t) / sin, jnp.sin(theta * t) / sin
  return jnp.where(colinear, (1 - t) * v0 + t * v1, s0 * v0 + s1 * v1)


def slerp(alphas, pool: Pool) -> PyTree:
  """SLERP of two checkpoints, tensor by tensor; alphas [2] = (1 - t, t) on the simplex (or
  [G, 2]: one t per layer group, mergekit's layer gradient). Base-free."""
  check(len(pool) == 2, f"SLERP interpolates 2 checkpoints, the pool has {len(pool)}",
        "--pool", "give a pool of exactly 2 checkpoints")
  return map_merge(lambda i, a, b, xs: slerp_tensors(a[1], *xs), alphas, pool)


# ----------------------------------------------------------------------------- soups

def uniform_over(members: Sequence[int], n: int) -> np.ndarray:
  w = np.zeros(n, np.float32)
  w[list(members)] = 1.0 / len(members)
  return w


def greedy_soup(fitness_of: Callable[[np.ndarray], float], single_fitness: Sequence[float]
                ) -> tuple[np.ndarray, list[int]]:
  """Wortsman et al.'s greedy soup: checkpoints by decreasing dev fitness, each added to the
  running uniform average only if that strictly improves dev fitness.

  fitness_of(alphas [N]) -> dev fitness (host side: one evaluation per candidate).
  Returns (alphas [N], the ingredients in the order they were added).
  """
  f = np.nan_to_num(np.asarray(single_fitness, np.float64), nan=-np.inf)
  order = np.argsort(-f, kind="stable")
  soup, best = [int(order[0])], f[order[0]]
  for i in order[1:]:
    fit = float(fitness_of(uniform_over(soup + [int(i)], len(f))))
    if np.isfinite(fit) and fit > best:
      soup.append(int(i))
      best = fit
  return uniform_over(soup, len(f)), soup
