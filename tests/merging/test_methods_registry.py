"""Every entry of the merge-method registry, through the same checks (a new method is
covered without a new test, as evosax's tests/conftest.py does for its algorithms); SLERP
against a numpy transcription of mergekit's `slerp`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.search import baselines
from recycle_jax.merging import kernels, methods, spaces
from recycle_jax.runtime.errors import UserError

METHODS = list(methods.REGISTRY)


def _tree(rng):
  return {"embed": {"embedding": rng.normal(size=(6, 4))},
          "layer_0": {"attn": {"q": {"kernel": rng.normal(size=(4, 4))}}},
          "final_norm": {"scale": rng.normal(size=(4,))}}


def _setup(spec, seed=0):
  """A pool of the method's size (3 when any) and a base, float32."""
  n = spec.num_models or 3
  rng = np.random.default_rng(seed)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(np.float32), t)
  base = f32(_tree(rng))
  pool = tuple(f32(jax.tree.map(lambda b: b + rng.normal(size=b.shape), base))
               for _ in range(n))
  return pool, base, n


def _leaves(t):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_merges_finite_trees_of_the_pool_shape(name):
  spec = methods.REGISTRY[name]
  pool, base, n = _setup(spec)
  alphas = np.random.default_rng(1).dirichlet(np.ones(n)).astype(np.float32)
  merged = jax.jit(lambda a, p, b: methods.merge(name, a, p, b, **spec.linear_hparams()))(
      alphas, pool, base)
  assert jax.tree.structure(merged) == jax.tree.structure(pool[0])
  for m, x in zip(jax.tree.leaves(merged), jax.tree.leaves(pool[0])):
    assert m.shape == x.shape and m.dtype == x.dtype and np.isfinite(m).all()
  if spec.needs_base:
    with pytest.raises(UserError, match="needs the base checkpoint"):
      methods.merge(name, alphas, pool)
  else:  # base-free: works without one
    methods.merge(name, alphas, pool, **spec.linear_hparams())
  if spec.num_models:
    with pytest.raises(UserError, match=f"merges {spec.num_models} checkpoints"):
      methods.merge(name, np.ones(n + 1) / (n + 1), pool + pool[:1], base)


@pytest.mark.parametrize("name", METHODS)
def test_one_hot_weights_at_the_linear_hparams_give_the_checkpoint(name):
  spec = methods.REGISTRY[name]
  if any(h.linear is None for h in spec.hparams) or not spec.members:
    pytest.skip("no linear-equivalent hyperparameters")
  pool, base, n = _setup(spec, 2)
  for i in range(n):
    got = methods.merge(name, np.eye(n, dtype=np.float32)[i], pool, base,
                        **spec.linear_hparams())
    for g, x in zip(_leaves(got), _leaves(pool[i])):
      np.testing.assert_allclose(g, x, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_search_space_and_a_layerwise_one(name):
  spec = methods.REGISTRY[name]
  pool, base, n = _setup(spec, 3)
  flat = spaces.make_space(name, pool[0], n)
  assert flat.tuned == spec.hparam_names and flat.dim == n + len(spec.hparams)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, flat.dim)), jnp.float32)
  w = np.asarray(flat.decode(x, spaces.relu_normalize))
  for j, h in enumerate(spec.hparams):
    lo, hi = h.bounds
    assert ((w[:, n + j] >= lo) & (w[:, n + j] <= hi)).all()
  np.testing.assert_allclose(flat.decode(jnp.asarray(flat.encode(w)), spaces.relu_normalize),
                             w, rtol=1e-4, atol=1e-5)
  init = np.asarray(flat.decode(jnp.asarray(flat.init_x())[None], spaces.relu_normalize))[0]
  np.testing.assert_allclose(init[n:], [h.default for h in spec.hparams], rtol=1e-3)
  operands = flat.operands(pool, base)
  merged, finite = jax.jit(flat.merge_checked)(jnp.asarray(w[0]), operands)
  assert bool(finite)
  # The same weights in every layer group merge as the flat space does.
  layered = spaces.make_space("layerwise" if spec.is_linear else f"layerwise_{name}",
                              pool[0], n)
  g = len(layered.groups)
  lw = np.concatenate([np.tile(w[0, :n], g), w[0, n:]])
  same = jax.jit(layered.merge)(jnp.asarray(lw), layered.operands(pool, base))
  for a, b in zip(_leaves(same), _leaves(merged)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert layered.describe(lw)["group_weights"] == np.round(lw[:g * n].reshape(g, n), 6).tolist()


@pytest.mark.parametrize("name", methods.baseline_methods())
def test_baseline_methods_give_candidates_of_their_space(name):
  spec = methods.REGISTRY[name]
  n = spec.num_models or 3
  (space, points), = baselines.task_vector_baselines(n, True, methods=[name]).values()
  assert points.shape[1] == space.dim and len(points) >= 1
  np.testing.assert_allclose(space.checkpoint_weights(points), 1.0 / n)


def test_derived_tables_cover_the_registry():
  order, marks = baselines.report_order(), baselines.markers()
  for name, spec in methods.REGISTRY.items():
    assert spec.is_linear or name in order
    assert (spec.marker is None) == (name not in marks)
  assert len(set(marks.values())) == len(marks)  # no two rows drawn alike
  from recycle_jax import cli
  parse = lambda *a: vars(cli.build_parser().parse_args(  # noqa: E731
      ["merge", "--pool=p", "--output=o", *a]))
  for name, h in methods.hparams_by_name().items():  # a flag per hyperparameter, None
    assert parse()[name] is None                     # unless given (cmd_merge: h.default)
    assert parse(f"--{name}={h.default}")[name] == h.default


# ----------------------------------------------------------------------------- SLERP

def _mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
  """mergekit/merge_methods/slerp.py `slerp`, in numpy (float64)."""
  v0_copy, v1_copy = np.copy(v0), np.copy(v1)
  n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
  v0 = v0 / n0 if n0 > eps else v0
  v1 = v1 / n1 if n1 > eps else v1
  dot = np.sum(v0 * v1)
  if np.abs(dot) > dot_threshold:
    return (1 - t) * v0_copy + t * v1_copy
  theta_0 = np.arccos(dot)
  sin_theta_0 = np.sin(theta_0)
  theta_t = theta_0 * t
  s0 = np.sin(theta_0 - theta_t) / sin_theta_0
  s1 = np.sin(theta_t) / sin_theta_0
  return s0 * v0_copy + s1 * v1_copy


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_equals_mergekit_reference(t):
  pool, _, _ = _setup(methods.REGISTRY["slerp"], 5)
  # One leaf nearly colinear: mergekit's linear fallback.
  pool = (pool[0], {**pool[1], "final_norm": {"scale": pool[0]["final_norm"]["scale"] * 1.5
                                              + 1e-4}})
  got = jax.jit(kernels.slerp)(np.array([1 - t, t], np.float32), pool)
  for g, a, b in zip(_leaves(got), *map(_leaves, pool)):
    np.testing.assert_allclose(g, _mergekit_slerp(t, a, b), rtol=1e-5, atol=1e-5)
  # Not the linear merge away from the endpoints and the colinear leaf.
  lin = kernels.linear(np.array([1 - t, t], np.float32), pool)
  diff = np.abs(np.asarray(got["layer_0"]["attn"]["q"]["kernel"]) -
                np.asarray(lin["layer_0"]["attn"]["q"]["kernel"])).max()
  assert (diff > 1e-3) == (0 < t < 1)
  np.testing.assert_allclose(got["final_norm"]["scale"], lin["final_norm"]["scale"], rtol=1e-6)


def test_slerp_per_layer_t_and_the_cli_registry_path():
  pool, _, _ = _setup(methods.REGISTRY["slerp"], 6)
  space = spaces.make_space("layerwise_slerp", pool[0], 2)
  assert space.groups == ("embed", "layer_0", "final") and space.dim == 6
  ts = [0.2, 0.7, 0.9]
  w = np.concatenate([[1 - t, t] for t in ts]).astype(np.float32)
  got = space.merge(jnp.asarray(w), space.operands(pool, None))
  _, gid = kernels.layer_groups(pool[0])
  for g, i, a, b in zip(_leaves(got), gid, *map(_leaves, pool)):
    np.testing.assert_allclose(g, _mergekit_slerp(ts[i], a, b), rtol=1e-5, atol=1e-5)
