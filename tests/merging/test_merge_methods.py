"""Merge methods beside linear, each against a small numpy reference; greedy soup; spaces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.merging import kernels, methods, spaces
from recycle_jax.runtime.errors import UserError

N = 3


def _tree(rng):
  """A model-shaped tree: embed, two layers, final norm."""
  return {"embed": {"embedding": rng.normal(size=(6, 4))},
          "layer_0": {"attn": {"q": {"kernel": rng.normal(size=(4, 4))}}},
          "layer_1": {"mlp": rng.normal(size=(4, 5))},
          "final_norm": {"scale": rng.normal(size=(4,))}}


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(np.float32), t)
  base = f32(_tree(rng))
  pool = tuple(jax.tree.map(lambda b: (b + rng.normal(size=b.shape)).astype(np.float32), base)
               for _ in range(N))
  return pool, base


def _leaves(t):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def _ref_trim(tv, density):
  k = int(round(density * tv.size))
  out = np.zeros_like(tv).ravel()
  idx = np.argsort(-np.abs(tv).ravel())[:k]
  out[idx] = tv.ravel()[idx]
  return out.reshape(tv.shape)


def _ref_disjoint(a, tvs):
  sign = np.sign(sum(w * t for w, t in zip(a, tvs)))
  agree = [(np.sign(t) == sign) & (t != 0) for t in tvs]
  num = sum(w * np.where(m, t, 0) for w, m, t in zip(a, agree, tvs))
  den = sum(w * m for w, m in zip(a, agree))
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0)


A = np.array([0.5, 0.3, 0.2], np.float32)


def test_task_arithmetic_equals_numpy_and_reduces_to_linear_at_lam_one():
  pool, base = _setup()
  got = jax.jit(kernels.task_arithmetic)(A, pool, base, 0.7)
  for g, b, *xs in zip(_leaves(got), _leaves(base), *map(_leaves, pool)):
    np.testing.assert_allclose(g, b + 0.7 * sum(a * (x - b) for a, x in zip(A, xs)),
                               rtol=1e-5, atol=1e-5)
  lin = kernels.linear(A, pool)
  for g, l in zip(_leaves(kernels.task_arithmetic(A, pool, base, 1.0)), _leaves(lin)):
    np.testing.assert_allclose(g, l, atol=1e-5)


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_equals_numpy_reference(density):
  pool, base = _setup(1)
  got = jax.jit(kernels.ties)(A, pool, base, 1.2, density)
  for g, b, *xs in zip(_leaves(got), _leaves(base), *map(_leaves, pool)):
    tvs = [_ref_trim(x - b, density) for x in xs]
    np.testing.assert_allclose(g, b + 1.2 * _ref_disjoint(A, tvs), rtol=1e-5, atol=1e-5)


def test_ties_density_can_be_traced_and_one_hot_gives_the_checkpoint():
  pool, base = _setup(2)
  f = jax.jit(jax.vmap(kernels.ties, in_axes=(None, None, None, None, 0)))
  out = f(A, pool, base, 1.0, jnp.array([0.3, 0.5]))
  ref = kernels.ties(A, pool, base, 1.0, 0.5)
  np.testing.assert_allclose(out["layer_1"]["mlp"][1], ref["layer_1"]["mlp"], atol=1e-6)
  one = kernels.ties(np.eye(N, dtype=np.float32)[1], pool, base, 1.0, 1.0)
  for g, x in zip(_leaves(one), _leaves(pool[1])):
    np.testing.assert_allclose(g, x, atol=1e-5)


def _dare_masks(key, pool, density):
  """The masks dare_* draw: per leaf i and checkpoint j, uniform(fold_in(fold_in(key, i), j))."""
  out = []
  for i, leaf in enumerate(jax.tree.leaves(pool[0])):
    k = jax.random.fold_in(key, i)
    out.append([np.asarray(jax.random.uniform(jax.random.fold_in(k, j), leaf.shape) < density)
                for j in range(N)])
  return out


@pytest.mark.parametrize("elect", [False, True])
def test_dare_equals_numpy_reference_given_its_masks(elect):
  pool, base = _setup(3)
  key, d = jax.random.key(7), 0.4
  fn = kernels.dare_ties if elect else kernels.dare_linear
  got = jax.jit(fn)(A, pool, base, key, 0.9, d)
  masks = _dare_masks(key, pool, d)
  for g, b, m, *xs in zip(_leaves(got), _leaves(base), masks, *map(_leaves, pool)):
    tvs = [np.where(mj, x - b, 0) / d for mj, x in zip(m, xs)]
    merged = _ref_disjoint(A, tvs) if elect else sum(a * t for a, t in zip(A, tvs))
    np.testing.assert_allclose(g, b + 0.9 * merged, rtol=1e-5, atol=1e-5)
  kept = np.mean(np.concatenate([mj.ravel() for m in masks for mj in m]))
  assert abs(kept - d) < 0.1
  # Density 1 drops nothing: DARE-linear is then task arithmetic.
  for g, t in zip(_leaves(kernels.dare_linear(A, pool, base, key, 0.9, 1.0)),
                  _leaves(kernels.task_arithmetic(A, pool, base, 0.9))):
    np.testing.assert_allclose(g, t, atol=1e-5)


def test_layerwise_uses_one_weight_row_per_group():
  pool, _ = _setup(4)
  names, gid = kernels.layer_groups(pool[0])
  assert names == ("embed", "layer_0", "layer_1", "final")
  rows = np.random.default_rng(0).dirichlet(np.ones(N), size=len(names)).astype(np.float32)
  got = jax.jit(kernels.layerwise)(rows, pool)
  for g, i, *xs in zip(_leaves(got), gid, *map(_leaves, pool)):
    np.testing.assert_allclose(g, sum(a * x for a, x in zip(rows[i], xs)), rtol=1e-5)
  same = methods.merge("linear", np.tile(A, (len(names), 1)), pool)
  for g, l in zip(_leaves(same), _leaves(kernels.linear(A, pool))):
    np.testing.assert_allclose(g, l, atol=1e-6)


def test_methods_need_a_base_and_dispatch_by_name():
  pool, base = _setup(5)
  with pytest.raises(UserError, match="needs the base checkpoint"):
    methods.merge("ties", A, pool)
  with pytest.raises(UserError, match="unknown merge method"):
    methods.merge("nope", A, pool)
  a = methods.merge("ties", A, pool, base=base, lam=0.5, density=0.3)
  b = kernels.ties(A, pool, base, 0.5, 0.3)
  np.testing.assert_array_equal(a["embed"]["embedding"], b["embed"]["embedding"])


def test_greedy_soup_adds_only_checkpoints_that_strictly_improve():
  # Fitness of a soup: high when it holds 0 and 2 (in any proportion), hurt by 1 and 3.
  def fitness_of(w):
    calls.append(tuple(np.round(w, 3)))
    return 10 * (w[0] > 0) + 10 * (w[2] > 0) - 5 * (w[1] > 0) - 20 * w[3]
  calls = []
  single = [10.0, 9.0, 8.0, 7.5]  # order: 0, 1, 2, 3
  w, soup = kernels.greedy_soup(fitness_of, single)
  assert soup == [0, 2]
  np.testing.assert_allclose(w, [0.5, 0, 0.5, 0])
  assert len(calls) == 3  # one evaluation per candidate after the first
  # Equal fitness is not an improvement.
  w, soup = kernels.greedy_soup(lambda w: 10.0, single)
  assert soup == [0]


def test_merge_space_decode_encode_lift_round_trip():
  pool, base = _setup(6)
  space = spaces.make_space("layerwise_ties", pool[0], N, density=0.5)
  assert space.dim == 4 * N + 2 and space.tuned == ("lam", "density")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, space.dim)), jnp.float32)
  w = np.asarray(space.decode(x, spaces.relu_normalize))
  np.testing.assert_allclose(w[:, :4 * N].reshape(5, 4, N).sum(-1), 1, rtol=1e-5)
  lam, dens = w[:, -2], w[:, -1]
  assert (lam >= 0).all() and (lam <= 4).all() and (dens >= 0.05).all() and (dens <= 1).all()
  np.testing.assert_allclose(space.decode(jnp.asarray(space.encode(w)), spaces.relu_normalize),
                             w, rtol=1e-4, atol=1e-5)
  init = np.asarray(space.decode(jnp.asarray(space.init_x())[None], spaces.relu_normalize))[0]
  np.testing.assert_allclose(init[-2:], [1.0, 0.5], rtol=1e-3)
  # A lifted linear point merges like the linear merge (TIES without trimming, one-hot).
  lifted = space.lift(np.eye(N, dtype=np.float32)[2:3])[0]
  merged = jax.jit(space.merge)(jnp.asarray(lifted), space.operands(pool, base))
  for g, x in zip(_leaves(merged), _leaves(pool[2])):
    np.testing.assert_allclose(g, x, atol=1e-5)
  np.testing.assert_allclose(space.checkpoint_weights(lifted), [0, 0, 1])
  assert space.describe(lifted)["groups"] == ["embed", "layer_0", "layer_1", "final"]
  with pytest.raises(UserError, match="unknown merge space"):
    spaces.make_space("nope", pool[0], N)
