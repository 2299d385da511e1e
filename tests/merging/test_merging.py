import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.merging import kernels, spaces
from recycle_jax.runtime.errors import UserError
import tree_helpers


def _pool(n, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple({"a": {"w": rng.normal(size=(4, 3)).astype(dtype)},
                "b": rng.normal(size=(5,)).astype(dtype)} for _ in range(n))


def test_linear_merge_equals_numpy_reference():
  pool = _pool(4)
  alphas = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  merged = jax.jit(kernels.linear)(alphas, pool)
  for key in ("b",):
    ref = sum(a * p[key].astype(np.float64) for a, p in zip(alphas, pool))
    np.testing.assert_allclose(merged[key], ref, rtol=1e-6, atol=1e-6)
  ref = sum(a * p["a"]["w"].astype(np.float64) for a, p in zip(alphas, pool))
  np.testing.assert_allclose(merged["a"]["w"], ref, rtol=1e-6, atol=1e-6)


def test_linear_merge_keeps_dtype_and_accumulates_in_float32():
  pool = _pool(3, dtype=jnp.bfloat16)
  merged = kernels.linear(jnp.array([0.2, 0.3, 0.5]), pool)
  assert merged["b"].dtype == jnp.bfloat16
  ref = sum(a * p["b"].astype(np.float32) for a, p in zip([0.2, 0.3, 0.5], pool))
  np.testing.assert_allclose(np.asarray(merged["b"], np.float32), ref, rtol=1e-2)


def test_population_merge_matches_single_merges():
  pool = _pool(3)
  alphas = np.array([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], np.float32)
  pop = tree_helpers.linear_population(alphas, pool)
  for i, a in enumerate(alphas):
    np.testing.assert_allclose(pop["b"][i], kernels.linear(a, pool)["b"], rtol=1e-6)


def test_relu_normalize_is_on_simplex_and_never_nan():
  x = jnp.array([[0.5, -1.0, 1.5], [0.0, 0.0, 0.0], [-1.0, -2.0, -3.0]])
  a = spaces.relu_normalize(x)
  np.testing.assert_allclose(a[0], [0.25, 0.0, 0.75])
  np.testing.assert_allclose(a[1], [1 / 3] * 3)
  np.testing.assert_allclose(a[2], [1 / 3] * 3)
  g = jax.grad(lambda v: spaces.relu_normalize(v).sum())(jnp.zeros(3))
  assert np.all(np.isfinite(g))


def test_nonfinite_merge_is_flagged_in_the_same_pass():
  pool = list(_pool(2))
  pool[1] = jax.tree.map(lambda x: x.copy(), pool[1])
  pool[1]["b"][2] = np.nan
  _, finite = tree_helpers.linear_checked(jnp.array([1.0, 0.0]), pool)
  assert not bool(finite)
  _, finite = tree_helpers.linear_checked(jnp.array([1.0, 0.0]), _pool(2))
  assert bool(finite)


@pytest.mark.parametrize("weights,msg", [
    ([1.0, 2.0], "got 2 weights"),
    ([1.0, -1.0, 1.0], "negative weight"),
    ([0.0, 0.0, 0.0], "all weights are zero"),
])
def test_explicit_weights_are_checked(weights, msg):
  with pytest.raises(UserError, match=msg):
    kernels.check_explicit_weights(weights, 3)


def test_explicit_weights_are_normalized():
  np.testing.assert_allclose(kernels.check_explicit_weights([1, 1, 2], 3), [0.25, 0.25, 0.5])
