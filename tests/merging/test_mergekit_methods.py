"""The methods mergekit has, each against a numpy reference written from mergekit's formula
(mergekit/merge_methods/*.py, mergekit/sparsify.py) on small random arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.merging import geometric, task_vectors

RNG = np.random.default_rng(0)


def _arrays(n, shape=(6, 8), seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape).astype(np.float32)
  return base, [(base + scale * rng.normal(size=shape)).astype(np.float32) for _ in range(n)]


def _j(xs):
  return [jnp.asarray(x) for x in xs]


# ----------------------------------------------------------------------------- references

def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
  t = np.stack(xs).astype(np.float64)
  if base is not None:
    t = t - base
  flat = t.reshape(len(xs), -1)
  w = np.asarray(w, np.float64)
  if normalize:
    w = w / w.sum()
  norms = np.linalg.norm(flat, axis=-1, keepdims=True)
  unit = flat / (norms + eps)
  mean = (unit * w[:, None]).sum(0)
  mean = mean / np.linalg.norm(mean)
  tangent = ((unit - (unit * mean).sum(-1, keepdims=True) * mean) * w[:, None]).sum(0)
  tn = np.linalg.norm(tangent) + eps
  res = (mean * np.cos(tn) + tangent * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
  res = res.reshape(t.shape[1:])
  return res if base is None else res + base


def ref_nuslerp(t, v0, v1, row_wise=False, flatten=True, eps=1e-8):
  shape = v0.shape
  v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
  if flatten:
    v0, v1 = v0.reshape(-1), v1.reshape(-1)
  elif row_wise:
    v0, v1 = v0.swapaxes(0, -1), v1.swapaxes(0, -1)
  n = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
  cos = (n(v0) * n(v1)).sum(-1, keepdims=True)
  th = np.arccos(np.clip(cos, -1, 1))
  res = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
  if not flatten and row_wise:
    res = res.swapaxes(0, -1)
  return res.reshape(shape)


def ref_karcher(xs, alphas, max_iter=10, tol=1e-5):
  norms = [np.linalg.norm(x.astype(np.float64)) for x in xs]
  units = [x / n if n else np.zeros_like(x, np.float64) for x, n in zip(xs, norms)]
  valid = [i for i, n in enumerate(norms) if n > tol]
  a = np.asarray([alphas[i] for i in valid]) / sum(alphas[i] for i in valid)
  vu = [units[i].ravel() for i in valid]
  u = sum(ai * ui for ai, ui in zip(a, vu))
  u = u / np.linalg.norm(u)
  for _ in range(max_iter):
    t = np.zeros_like(u)
    for ai, ui in zip(a, vu):
      dot = np.clip(u @ ui, -1, 1)
      th = np.arccos(dot)
      if th < tol:
        continue
      t += ai * th / np.sin(th) * (ui - dot * u)
    nt = np.linalg.norm(t)
    if nt < tol:
      break
    u = np.cos(nt) * u + np.sin(nt) * t / nt
    u = u / np.linalg.norm(u)
  return (sum(ai * n for ai, n in zip(alphas, norms)) * u).reshape(xs[0].shape)


def ref_model_stock(base, xs, filter_wise=False):
  shape = base.shape
  rows = (lambda v: v.reshape(-1, shape[-1])) if filter_wise else (lambda v: v.reshape(1, -1))
  w0, ws = rows(base.astype(np.float64)), [rows(x.astype(np.float64)) for x in xs]
  off = [w - w0 for w in ws]
  cos = []
  for i in range(len(off)):
    for j in range(i + 1, len(off)):
      nn = np.linalg.norm(off[i], axis=-1) * np.linalg.norm(off[j], axis=-1)
      cos.append(np.clip((off[i] * off[j]).sum(-1) / np.maximum(nn, 1e-6), -1, 1))
  c = np.mean(cos, axis=0)[:, None]
  n = len(ws)
  t = n * c / (1 + (n - 1) * c)
  return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def ref_magnitude(tv, density):
  """mergekit sparsify.magnitude: exactly max(1, int(density * numel)) largest magnitudes."""
  if density >= 1:
    return tv
  k = max(1, int(density * tv.size))
  mask = np.zeros(tv.size)
  mask[np.argsort(-np.abs(tv).ravel(), kind="stable")[:k]] = 1
  return tv * mask.reshape(tv.shape)


def ref_magnitude_outliers(tv, density, gamma):
  """mergekit sparsify.magnitude_outliers."""
  if density >= 1:
    return tv
  n = tv.size
  target, n_top = int(density * n), int(gamma * n)
  n_bot = max(0, n - target - n_top)
  mask = np.zeros(n)
  mask[np.argsort(np.abs(tv).ravel(), kind="stable")[n_bot:n_bot + target]] = 1
  return tv * mask.reshape(tv.shape)


def ref_gta(base, xs, weights, lam, tvs, consensus, normalize):
  """mergekit generalized_task_arithmetic.GTATask.execute on given sparse task vectors."""
  w = np.asarray(weights, np.float64)[:, None, None]
  wd = np.stack(tvs) * w
  if consensus:
    major = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(wd) == major
    mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
    div[div == 0] = 1
  else:
    mixed, div = wd.sum(0), w.sum()
    div = 1.0 if abs(div) < 1e-8 else div
  if normalize:
    mixed = mixed / div
  return base + lam * mixed


def close(got, want, tol=2e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- geometric

@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_equals_mergekit_formula(with_base):
  base, xs = _arrays(3, seed=1)
  w = [0.5, 0.2, 0.7]
  got = jax.jit(lambda xs, b: geometric.multislerp_leaf(xs, jnp.asarray(w), b))(
      _j(xs), jnp.asarray(base) if with_base else None)
  close(got, ref_multislerp(xs, w, base if with_base else None))


def test_multislerp_of_antipodal_pair_falls_back_to_linear():
  a = np.ones((3, 4), np.float32)
  got = geometric.multislerp_leaf(_j([a, -a]), jnp.asarray([0.5, 0.5]))
  close(got, np.zeros((3, 4)))


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_equals_mergekit_formula(row_wise, flatten):
  base, (a, b) = _arrays(2, seed=2)
  t = float(geometric.nuslerp_t(0.3, 0.9))
  assert t == pytest.approx(0.75)
  got = jax.jit(lambda a, b: geometric.nuslerp_leaf(t, a, b, None, row_wise, flatten))(a, b)
  close(got, ref_nuslerp(t, a, b, row_wise, flatten))
  got = geometric.nuslerp_leaf(t, jnp.asarray(a), jnp.asarray(b), jnp.asarray(base))
  close(got, base + ref_nuslerp(t, a - base, b - base))
  # Colinear vectors: linear interpolation, not 0 / 0.
  close(geometric.nuslerp_leaf(t, jnp.asarray(a), jnp.asarray(2 * a)), (1 - t) * a + 2 * t * a)


@pytest.mark.parametrize("max_iter", [1, 10])
def test_karcher_equals_mergekit_iteration(max_iter):
  _, xs = _arrays(3, seed=3, scale=0.3)
  alphas = [1 / 3] * 3
  got = jax.jit(lambda xs: geometric.karcher_leaf(xs, jnp.asarray(alphas), max_iter))(_j(xs))
  close(got, ref_karcher(xs, alphas, max_iter))
  # A zero tensor takes no part in the direction; its norm (0) still counts in the scale.
  zs = xs[:2] + [np.zeros_like(xs[0])]
  close(geometric.karcher_leaf(_j(zs), jnp.asarray(alphas)), ref_karcher(zs, alphas))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit_formula(filter_wise):
  base, xs = _arrays(3, seed=4)
  got = jax.jit(lambda b, xs: geometric.model_stock_leaf(b, xs, filter_wise=filter_wise))(
      base, _j(xs))
  close(got, ref_model_stock(base, xs, filter_wise))
  # Opposite task vectors (cos = -1 for N = 2): 1 + (N - 1) cos = 0, the base is kept.
  b, x = jnp.asarray(base), jnp.asarray(xs[0])
  close(geometric.model_stock_leaf(b, [x, 2 * b - x]), base)


# ----------------------------------------------------------------------------- sparsification

@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_mergekit_magnitude_keeps_exactly_floor_k(density):
  base, xs = _arrays(1, shape=(10, 10), seed=5)
  tv = xs[0] - base
  got = task_vectors.magnitude(jnp.asarray(tv), density, None, True, False, 0, 0)
  close(got, ref_magnitude(tv, density))
  # Ties at the threshold: exactly k kept (by position); recycle_jax's own rule keeps all.
  tied = np.ones((4, 5), np.float32)
  assert int(np.count_nonzero(task_vectors.magnitude(jnp.asarray(tied), 0.37, None, True,
                                                     False, 0, 0))) == 7
  assert int(np.count_nonzero(task_vectors.magnitude(jnp.asarray(tied), 0.37, None, False,
                                                     False, 0, 0))) == 20
  # A positive density keeps at least one entry (mergekit 0.1.5).
  assert int(np.count_nonzero(task_vectors.magnitude(jnp.asarray(tv), 0.001, None, True,
                                                     False, 0, 0))) == 1


def test_floor_count_is_mergekit_int_on_the_host():
  assert task_vectors.floor_count(0.7, 10) == 7  # float64 0.7 * 10 = 7.000000000000001
  assert int(task_vectors.floor_count(jnp.float32(0.5), 9)) == 4


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.5, 0.01), (0.9, 0.2)])
def test_breadcrumbs_band_equals_mergekit(density, gamma):
  base, xs = _arrays(1, shape=(6, 8), seed=6)
  tv = xs[0] - base
  got = task_vectors.magnitude_outliers(jnp.asarray(tv), density, None, True, False, gamma, 0)
  close(got, ref_magnitude_outliers(tv, density, gamma))
  assert np.count_nonzero(np.asarray(got)) == int(density * tv.size)


def test_dare_mergekit_rule_keeps_density_and_the_l1_norm():
  tv = np.random.default_rng(7).normal(size=(64, 64)).astype(np.float32)
  got = np.asarray(task_vectors.random(jnp.asarray(tv), 0.3, jax.random.key(1), True, True,
                                       0, 0))
  assert abs(np.mean(got != 0) - 0.3) < 0.02
  np.testing.assert_allclose(np.abs(got).sum(), np.abs(tv).sum(), rtol=1e-5)
  kept = got != 0
  np.testing.assert_allclose(got[kept] / tv[kept], np.abs(tv).sum() / np.abs(tv[kept]).sum(),
                             rtol=1e-5)
  own = np.asarray(task_vectors.random(jnp.asarray(tv), 0.3, jax.random.key(1), False, True,
                                       0, 0))
  np.testing.assert_allclose(own[own != 0], tv[own != 0] / 0.3, rtol=1e-6)


@pytest.mark.parametrize("mergekit_rules", [True, False])
def test_della_keep_probability_rises_with_magnitude(mergekit_rules):
  tv = np.random.default_rng(8).normal(size=(256, 50)).astype(np.float32)
  key, d, e = jax.random.key(2), 0.5, 0.2
  got = np.asarray(task_vectors.della_magprune(jnp.asarray(tv), d, key, mergekit_rules,
                                               True, 0, e))
  rank = np.argsort(np.argsort(np.abs(tv), axis=1, kind="stable"), axis=1, kind="stable")
  p = d - e + 2 * e * rank / (tv.shape[1] - 1)
  kept = np.asarray(jax.random.uniform(key, tv.shape)) < p  # the draw the kernel makes
  np.testing.assert_array_equal(got != 0, kept)
  lo, hi = kept[rank < 10].mean(), kept[rank >= 40].mean()
  assert lo < 0.4 < 0.6 < hi  # p: 0.3 .. 0.7
  if mergekit_rules:
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(tv).sum(), rtol=1e-5)
  else:
    np.testing.assert_allclose(got[kept], (tv / p)[kept], rtol=1e-5)


# ----------------------------------------------------------------------------- combination

CASES = {  # mergekit's method -> (sparsify, consensus, default normalize)
    "task_arithmetic": (None, False, False), "ties": ("magnitude", True, True),
    "breadcrumbs": ("magnitude_outliers", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False)}


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("weights", [(0.6, 0.3, 0.5), (1.0, -0.5, 0.8)])
def test_generalized_task_arithmetic_equals_mergekit(method, weights):
  sparsify, consensus, normalize = CASES[method]
  base, xs = _arrays(3, shape=(10, 12), seed=9)
  density, gamma, lam = (0.6, 0.4, 0.8), 0.05, 0.9
  got = jax.jit(lambda b, xs: task_vectors.combine(
      b, xs, jnp.asarray(weights), lam, sparsify=sparsify, density=jnp.asarray(density),
      consensus=consensus, normalize=normalize, mergekit_rules=True, gamma=gamma))(
          base, _j(xs))
  rule = {None: lambda t, d: t, "magnitude": ref_magnitude,
          "magnitude_outliers": lambda t, d: ref_magnitude_outliers(t, d, gamma)}[sparsify]
  tvs = [rule(x - base, d) for x, d in zip(xs, density)]
  close(got, ref_gta(base, xs, weights, lam, tvs, consensus, normalize))


def test_task_negation_subtracts_the_task_vector():
  base, xs = _arrays(1, seed=10)
  got = task_vectors.combine(jnp.asarray(base), _j(xs), jnp.asarray([-1.0]), 1.0,
                             normalize=False)
  close(got, base - (xs[0] - base))


def test_tree_methods_map_leaves_and_keep_dtypes():
  base, xs = _arrays(3, shape=(12, 10), seed=11)
  tree = lambda a: {"embed": {"embedding": a.astype(jnp.bfloat16)}, "layer_0": {"w": a}}
  pool, b = tuple(tree(jnp.asarray(x)) for x in xs), tree(jnp.asarray(base))
  a = jnp.asarray([0.2, 0.3, 0.5])
  for fn in (task_vectors.breadcrumbs, task_vectors.breadcrumbs_ties):
    out = jax.jit(fn)(a, pool, b, 1.0, 0.5, 0.05)
    assert out["embed"]["embedding"].dtype == jnp.bfloat16
    assert out["layer_0"]["w"].dtype == jnp.float32
  key = jax.random.key(0)
  for fn in (task_vectors.della, task_vectors.della_linear):
    out = jax.jit(fn)(a, pool, b, key, 1.0, 0.5, 0.1)
    assert np.all(np.isfinite(np.asarray(out["layer_0"]["w"])))
  ms = geometric.model_stock(jnp.full(3, 1 / 3), pool, b)
  close(ms["layer_0"]["w"], ref_model_stock(base, xs), 1e-4)
  ks = geometric.karcher(jnp.full(3, 1 / 3), pool)
  close(ks["layer_0"]["w"], ref_karcher(xs, [1 / 3] * 3), 1e-4)
  mls = geometric.multislerp(a, pool)
  close(mls["layer_0"]["w"], ref_multislerp(xs, np.asarray(a)), 1e-4)
  nu = geometric.nuslerp(jnp.asarray([0.25, 0.75]), pool[:2])
  close(nu["layer_0"]["w"], ref_nuslerp(0.75, xs[0], xs[1]), 1e-4)
