"""Search strategies as same-budget ablations; scalarizations inside the generation."""
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax import pareto, search

N = 4
E = np.eye(N, dtype=np.float32)


def _two_tasks(alphas, pool, datas):
  """Task t peaks (100) at checkpoint t alone: the tasks trade off against each other."""
  d = jnp.stack([jnp.sum((alphas - E[t]) ** 2, -1) for t in (0, 1)], -1)
  return 100 - 50 * d, jnp.ones(alphas.shape[0], bool)


def _run(budget=32, **kw):
  cfg = search.SearchConfig(budget=budget, sigma_init=0.3, population_size=8, **kw)
  s = search.Search(cfg, N, _two_tasks)
  return s, search.run(s, None, None, workdir=None, progress=False)


@pytest.mark.parametrize("strategy", search.STRATEGIES)
def test_every_strategy_runs_end_to_end_with_the_same_budget(strategy):
  s, archive = _run(strategy=strategy)
  assert len(archive) == 32 and s.pop == 8
  a = np.asarray(archive.alphas)
  np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)
  assert np.isfinite(archive.fitness).all()
  best = archive.fitness[archive.best()]
  uniform = float(np.asarray(_two_tasks(jnp.full((1, N), 1 / N), None, None)[0]).mean())
  assert best >= uniform - 10  # random search only has to land near the start


def test_weighted_and_chebyshev_scalarizations_steer_the_search_and_share_its_program():
  s0, a0 = _run(seed=1, scalarization="weighted", task_weights=(1.0, 0.0))
  s1, a1 = _run(seed=1, scalarization="chebyshev", task_weights=(0.2, 0.8))
  assert s0._jit_generation is s1._jit_generation  # one program for every scalarization
  best0 = np.asarray(a0.scores)[a0.best()]
  assert best0[0] > best0[1] + 20  # all weight on task 0
  best1 = np.asarray(a1.scores)[a1.best()]
  assert best1[1] > best1[0]  # task 1's deficit is penalized 4x more
  np.testing.assert_allclose(a0.fitness, np.asarray(a0.scores)[:, 0], rtol=1e-5)
