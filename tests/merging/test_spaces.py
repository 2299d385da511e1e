"""CMA-ES over non-linear merge spaces (layer-wise weights; task arithmetic with its lam
tuned) through the real population function, scored by distance to a known target merge."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.evaluation import task_data
from recycle_jax.search import baselines, population, loop
from recycle_jax.merging import kernels, spaces

N = 3


def _setup():
  rng = np.random.default_rng(0)
  tree = lambda: {"embed": {"embedding": rng.normal(size=(6, 4))},
                  "layer_0": {"w": rng.normal(size=(4, 4))},
                  "final_norm": {"scale": rng.normal(size=(4,))}}
  base = jax.tree.map(lambda x: x.astype(np.float32), tree())
  pool = tuple(jax.tree.map(lambda b: (b + rng.normal(size=b.shape)).astype(np.float32), base)
               for _ in range(N))
  return pool, base


def _closeness_to(target):
  """score(params, datas) -> [2]: 100 minus the squared distance to `target`, on the first
  leaf and on the rest (two 'tasks')."""
  def score(params, datas):
    d = [jnp.mean((a - b) ** 2) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target))]
    return jnp.stack([100 - 100 * d[0], 100 - 100 * sum(d[1:])])
  return score


def _search(space, operands, score, budget=240):
  pop_fn = jax.jit(population.make_population_fn(score, "vmap", space.merge))
  cfg = loop.SearchConfig(budget=budget, sigma_init=0.3, population_size=8)
  s = loop.Search(cfg, N, pop_fn, space)
  archive = loop.run(s, operands, None, workdir=None, progress=False)
  return s, archive


def test_layerwise_search_recovers_per_group_weights():
  pool, _ = _setup()
  rows = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]], np.float32)
  space = spaces.make_space("layerwise", pool[0], N)
  assert space.groups == ("embed", "layer_0", "final") and space.dim == 9
  s, archive = _search(space, space.operands(pool, None),
                       _closeness_to(kernels.layerwise(rows, pool)))
  assert s.dim == 9 and s.pop == 8
  best = np.asarray(archive.points[archive.best()]).reshape(3, N)
  np.testing.assert_allclose(best, rows, atol=0.12)
  # No single weight vector does as well: the per-group search beats the best linear merge.
  linear_best = max(float(np.mean(_closeness_to(kernels.layerwise(rows, pool))(
      kernels.linear(rows[g], pool), None))) for g in range(3))
  assert archive.fitness[archive.best()] > linear_best + 1


def test_task_arithmetic_search_tunes_lam():
  pool, base = _setup()
  alphas = np.array([0.5, 0.3, 0.2], np.float32)
  space = spaces.make_space("task_arithmetic", pool[0], N)
  assert space.tuned == ("lam",) and space.dim == N + 1
  s, archive = _search(space, space.operands(pool, base),
                       _closeness_to(kernels.task_arithmetic(alphas, pool, base, 1.8)))
  best = np.asarray(archive.points[archive.best()])
  np.testing.assert_allclose(best[:N], alphas, atol=0.1)
  assert abs(best[N] - 1.8) < 0.2
  np.testing.assert_allclose(space.checkpoint_weights(best), best[:N])


def test_method_baselines_are_scored_by_one_program_made_for_them(caplog):
  """A merge method's candidates, merged by their space where the pool lies, are scored by
  the run's program for one tree (population.Programs.score_trees): compiled once for every
  candidate and method, each score as the tree's own; a diverged merge scores NaN; every
  linear space shares the pool's own population program."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  pool, base = jax.device_put(_setup(), jax.devices()[0])  # committed, as restored pools are

  def leaf_sums(params, datas):
    return jnp.stack([jnp.sum(x) for x in jax.tree.leaves(params)])
  programs = population.Programs(leaf_sums, pool, base, mesh, lambda params, size: "map")
  datas = tuple(task_data.TaskData(tokens=np.zeros((1, 1), np.int32),  # the score
                                     target_mask=np.zeros((1, 1), bool), name=f"t{t}")
                for t in range(3))  # ignores them: three 'tasks'
  got = {}
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for m, (space, points) in baselines.task_vector_baselines(N, True).items():
      merge = jax.jit(space.merge, out_shardings=jax.tree.map(lambda x: x.sharding, pool[0]))
      trees = [merge(p, space.operands(pool, base)) for p in points]
      trees.insert(1, jax.tree.map(lambda x: x * np.nan, trees[0]))  # a diverged merge
      got[m] = (programs.score_trees(trees, datas), trees)
  compiled = [r for r in caplog.records if "Compiling jit(leaf_sums)" in r.getMessage()]
  assert len(got) >= 2 and len(compiled) == 1  # one program for every method's candidates
  for scores, trees in got.values():
    assert np.isnan(scores[1]).all() and np.isfinite(np.delete(scores, 1, 0)).all()
    for i in range(len(trees)):
      if i != 1:
        np.testing.assert_allclose(scores[i], np.asarray(leaf_sums(trees[i], None)), rtol=1e-6)
  linear = programs.scorer(spaces.MergeSpace(n=N), 4)
  assert programs.scorer(spaces.MergeSpace(n=N, seed=3), 4) is linear


@pytest.mark.parametrize("name", spaces.REGISTRY)
def test_every_parametrization_maps_onto_the_simplex_and_back(name):
  p = spaces.get(name)
  space = spaces.MergeSpace(n=6)
  x = jax.random.normal(jax.random.key(0), (50, 6)) * 2
  w = np.asarray(space.decode(x, p))
  assert (w >= 0).all()
  np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(space.decode(jnp.asarray(space.init_x(p))[None], p), 1 / 6,
                             rtol=1e-5)
  target = np.array([[0.5, 0.3, 0.2, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(space.decode(jnp.asarray(space.encode(target, p)), p), target,
                             atol=1e-5)
  # A search in it: every evaluated point on the simplex.
  cfg = loop.SearchConfig(budget=16, population_size=8, parametrization=name)
  s = loop.Search(cfg, 6, jax.jit(population.make_population_fn(
      lambda params, datas: jnp.stack([params.sum(), -params.sum()]), "vmap",
      lambda a, pool: a * pool)))
  archive = loop.run(s, jnp.arange(6.0), None, workdir=None, progress=False)
  np.testing.assert_allclose(np.asarray(archive.points).sum(-1), 1, rtol=1e-5)


def test_box_starts_dense_where_relu_normalize_drops_half_the_pool():
  """First-generation samples at N = 16 with each parametrization's default step: relu
  zeroes about half of the weights (P(x < 0) = 0.48), the box almost none."""
  space = spaces.MergeSpace(n=16)
  x = jax.random.normal(jax.random.key(1), (4000, 16))
  dense = {}
  for name in ("relu_normalize", "box"):
    p = spaces.get(name)
    w = np.asarray(space.decode(jnp.asarray(space.init_x(p)) + p.sigma * x, p))
    dense[name] = float((w > 1e-6).mean())
  assert 0.45 < dense["relu_normalize"] < 0.6 and dense["box"] > 0.99
