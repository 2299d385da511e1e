"""Merging a pool of parameter trees, and the weight parametrizations searched over.

The pool is a tuple of N parameter trees with identical structure (no stacked pool
axis: each leaf keeps the sharding of its own parameter, and the merge is one fused
elementwise pass reading N inputs). Accumulation is float32; results are cast back to
the stored dtype.

Beside the linear merge: layer-wise linear merging (one weight vector per layer group),
task-vector methods against the base checkpoint (task arithmetic, TIES, DARE), the greedy
soup, and `MergeSpace`: which of them a search optimizes, and over which dimensions.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.errors import check
from recycle_jax.partitioning import path_str

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


def _map_merge(leaf_fn: Callable, alphas, pool: Pool, base: PyTree | None = None) -> PyTree:
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
  return _map_merge(lambda i, a, b, xs: _wsum(a, xs), alphas, pool)


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
  return _map_merge(leaf, alphas, pool, base)


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


def _need_base(base: PyTree | None, method: str) -> PyTree:
  check(base is not None, f"merge method {method!r} needs the base checkpoint the pool was "
        "fine-tuned from", "--base / Experiment.base", "pass the base checkpoint's path")
  return base


def _key(key) -> jax.Array:
  return jax.random.key(0) if key is None else key


METHODS: dict[str, Callable[..., PyTree]] = {
    "linear": lambda alphas, pool, base=None: (
        linear if jnp.ndim(alphas) == 1 else layerwise)(alphas, pool),
    "task_arithmetic": lambda alphas, pool, base=None, lam=1.0: task_arithmetic(
        alphas, pool, _need_base(base, "task_arithmetic"), lam),
    "ties": lambda alphas, pool, base=None, lam=1.0, density=0.5: ties(
        alphas, pool, _need_base(base, "ties"), lam, density),
    "dare_linear": lambda alphas, pool, base=None, key=None, lam=1.0, density=0.5:
        dare_linear(alphas, pool, _need_base(base, "dare_linear"), _key(key), lam, density),
    "dare_ties": lambda alphas, pool, base=None, key=None, lam=1.0, density=0.5:
        dare_ties(alphas, pool, _need_base(base, "dare_ties"), _key(key), lam, density),
}
# The hyperparameters of each method, in search-vector order.
HPARAMS: dict[str, tuple[str, ...]] = {
    "linear": (), "task_arithmetic": ("lam",), "ties": ("lam", "density"),
    "dare_linear": ("lam", "density"), "dare_ties": ("lam", "density")}
# Search bounds of tuned hyperparameters (a sigmoid maps R onto them), and the values at
# which a method reproduces the linear merge (exactly, or for TIES without trimming).
BOUNDS = {"lam": (0.0, 4.0), "density": (0.05, 1.0)}
LINEAR_HPARAMS = {"lam": 1.0, "density": 1.0}


def needs_base(method: str) -> bool:
  return method != "linear"


@gin.configurable
def merge(method: str, alphas: jax.Array, pool: Pool, base: PyTree | None = None,
          **hparams) -> PyTree:
  """Dispatch to a merge method by name (linear unless configured otherwise).

  alphas [N], or [G, N] for one weight vector per layer group; hparams: lam, density, key.
  """
  fn = METHODS.get(method)
  check(fn is not None, f"unknown merge method {method!r}", "--method",
        f"choose from {sorted(METHODS)}")
  return fn(alphas, pool, base=base, **hparams)


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


# ----------------------------------------------------------------------------- search spaces

def bounded(x, lo: float, hi: float):
  return lo + (hi - lo) * jax.nn.sigmoid(x)


def unbounded(v, lo: float, hi: float) -> np.ndarray:
  p = np.clip((np.asarray(v, np.float64) - lo) / (hi - lo), 1e-3, 1 - 1e-3)
  return np.log(p / (1 - p))


@dataclasses.dataclass(frozen=True)
class MergeSpace:
  """What a search optimizes: a merge method, its weights (one vector, or one per layer
  group) and its tuned hyperparameters.

  A point is a flat vector w = [alphas (G*N, row-major, each row on the simplex), tuned
  hyperparameters in `tuned` order]; the strategy samples x of the same layout, mapped to w
  by the weight parametrization and the bounded transforms. Hashable (a jit cache key).
  """
  method: str = "linear"
  n: int = 1
  groups: tuple[str, ...] = ()  # layer groups; () = one weight vector for every leaf
  tuned: tuple[str, ...] = ()
  hparams: tuple[tuple[str, float], ...] = ()  # fixed values, or initial ones when tuned
  seed: int = 0  # DARE's drop mask: fixed, so a candidate's fitness is not noisy

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
    if not needs_base(self.method):
      return tuple(params)
    return tuple(params), _need_base(base, self.method)

  def unpack(self, w) -> tuple[jax.Array, dict]:
    a = w[:self.num_weights]
    alphas = a.reshape(len(self.groups), self.n) if self.groups else a
    hp = dict(self.hparams)
    hp.update({k: w[self.num_weights + j] for j, k in enumerate(self.tuned)})
    return alphas, hp

  def merge(self, w: jax.Array, operands: PyTree) -> PyTree:
    alphas, hp = self.unpack(w)
    params, base = operands if needs_base(self.method) else (operands, None)
    if self.method.startswith("dare"):
      hp["key"] = jax.random.key(self.seed)
    return merge(self.method, alphas, params, base=base, **hp)

  def merge_checked(self, w: jax.Array, operands: PyTree) -> tuple[PyTree, jax.Array]:
    """The merge and whether it is all finite, in one program."""
    merged = self.merge(w, operands)
    return merged, all_finite(merged)

  def decode(self, x: jax.Array, parametrize: Callable) -> jax.Array:
    """[..., dim] strategy samples -> [..., dim] points w."""
    lead, g = x.shape[:-1], max(1, len(self.groups))
    a = parametrize(x[..., :self.num_weights].reshape(*lead, g, self.n))
    hs = [bounded(x[..., self.num_weights + j], *BOUNDS[k]) for j, k in enumerate(self.tuned)]
    return jnp.concatenate([a.reshape(*lead, self.num_weights)] +
                           [h[..., None] for h in hs], axis=-1)

  def encode(self, w: np.ndarray) -> np.ndarray:
    """Points -> samples that decode to them (weights on the simplex are their own x under
    relu_normalize); used to tell already evaluated points to the strategy."""
    w = np.asarray(w, np.float32)
    hs = [unbounded(w[..., self.num_weights + j], *BOUNDS[k]) for j, k in enumerate(self.tuned)]
    return np.concatenate([w[..., :self.num_weights]] + [h[..., None] for h in hs],
                          axis=-1).astype(np.float32)

  def lift(self, alphas: np.ndarray) -> np.ndarray:
    """Linear weights [K, N] -> points [K, dim] of this space that merge the same way."""
    alphas = np.asarray(alphas, np.float32)
    tiled = np.tile(alphas, (1, max(1, len(self.groups))))
    hs = np.full((len(alphas), len(self.tuned)),
                 [LINEAR_HPARAMS[k] for k in self.tuned], np.float32)
    return np.concatenate([tiled, hs.reshape(len(alphas), -1)], axis=-1)

  def init_x(self) -> np.ndarray:
    """The strategy's initial mean: uniform weights and the configured hyperparameters."""
    w = np.concatenate([np.full(self.num_weights, 1.0 / self.n, np.float32),
                        np.asarray([dict(self.hparams)[k] for k in self.tuned], np.float32)])
    return self.encode(w)

  def checkpoint_weights(self, w: np.ndarray) -> np.ndarray:
    """[..., dim] -> [..., N]: each checkpoint's weight averaged over the groups."""
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


SPACE_NAMES = tuple(METHODS) + ("layerwise",) + tuple(f"layerwise_{m}" for m in METHODS
                                                       if m != "linear")


def parse_space(name: str) -> tuple[str, bool]:
  """'layerwise_ties' -> ('ties', True); 'layerwise' -> ('linear', True)."""
  check(name in SPACE_NAMES, f"unknown merge space {name!r}", "SearchConfig.merge_space",
        f"choose from {list(SPACE_NAMES)}")
  return name.removeprefix("layerwise").removeprefix("_") or "linear", name.startswith("layerwise")


@gin.configurable
def make_space(name: str, tree: PyTree, n: int, tune: bool = True, lam: float = 1.0,
               density: float = 0.5, seed: int = 0) -> MergeSpace:
  """'linear' | 'layerwise' | a task-vector method | 'layerwise_<method>'.

  tree: one parameter tree of the pool (its paths give the layer groups).
  tune: search the method's hyperparameters (lam, density) too, starting from the values
  given here; otherwise they stay fixed at them.
  """
  method, layerwise_ = parse_space(name)
  values = {"lam": float(lam), "density": float(density)}
  names = HPARAMS[method]
  return MergeSpace(method, n, layer_groups(tree)[0] if layerwise_ else (),
                    names if tune else (), tuple((k, values[k]) for k in names), seed)
