"""Search strategies as same-budget ablations; scalarizations inside the generation."""
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.search import loop, strategies

N = 4
E = np.eye(N, dtype=np.float32)


def _two_tasks(alphas, pool, datas):
  """Task t peaks (100) at checkpoint t alone: the tasks trade off against each other."""
  d = jnp.stack([jnp.sum((alphas - E[t]) ** 2, -1) for t in (0, 1)], -1)
  return 100 - 50 * d, jnp.ones(alphas.shape[0], bool)


def _run(budget=32, programs=None, **kw):
  cfg = loop.SearchConfig(budget=budget, sigma_init=0.3, population_size=8, **kw)
  s = loop.Search(cfg, N, _two_tasks, programs=programs)
  return s, loop.run(s, None, None, workdir=None, progress=False)


@pytest.mark.parametrize("strategy", strategies.REGISTRY)
def test_every_strategy_runs_end_to_end_with_the_same_budget(strategy):
  s, archive = _run(strategy=strategy)
  assert len(archive) == 32 and s.pop == 8
  a = np.asarray(archive.points)
  np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)
  assert np.isfinite(archive.fitness).all()
  best = archive.fitness[archive.best()]
  uniform = float(np.asarray(_two_tasks(jnp.full((1, N), 1 / N), None, None)[0]).mean())
  assert best >= uniform - 10  # random search only has to land near the start


def test_weighted_and_chebyshev_scalarizations_steer_the_search_and_share_its_program():
  programs = {}  # a run's cache of compiled programs
  s0, a0 = _run(seed=1, scalarization="weighted", task_weights=(1.0, 0.0), programs=programs)
  s1, a1 = _run(seed=1, scalarization="chebyshev", task_weights=(0.2, 0.8), programs=programs)
  assert s0._jit_generation is s1._jit_generation  # one program for every scalarization
  other_run = loop.Search(s0.cfg, N, _two_tasks)  # the cache is the run's, not the process's
  assert other_run._jit_generation is not s0._jit_generation
  best0 = np.asarray(a0.scores)[a0.best()]
  assert best0[0] > best0[1] + 20  # all weight on task 0
  best1 = np.asarray(a1.scores)[a1.best()]
  assert best1[1] > best1[0]  # task 1's deficit is penalized 4x more
  np.testing.assert_allclose(a0.fitness, np.asarray(a0.scores)[:, 0], rtol=1e-5)


HOST = [name for name, s in strategies.REGISTRY.items() if s.host]


@pytest.mark.parametrize("strategy", HOST)
def test_host_strategy_warm_starts_and_resumes_bit_for_bit(strategy, tmp_path):
  """Seeds (the one-hot checkpoints) as history and warm start; interrupted after two
  generations, the resumed study (rebuilt from the archive) proposes the same points."""
  seeds = (E, np.asarray(_two_tasks(jnp.asarray(E), None, None)[0]), None)
  def go(wd, resume=False, stop=None):
    cfg = loop.SearchConfig(budget=40, population_size=8, strategy=strategy,
                              parametrization="box", warm_start=True)
    s = loop.Search(cfg, N, _two_tasks)
    return loop.run(s, None, None, str(tmp_path / wd), resume=resume, progress=False,
                      seeds=loop.Seeds.of(s.space, seeds[0], seeds[1], s.param),
                      on_generation=stop)
  full = go("a")
  assert len(full) == N + 40 and np.isfinite(full.fitness).all()
  class Stop(Exception):
    pass
  def stop(g, archive):
    if g == 1:
      raise Stop
  with pytest.raises(Stop):
    go("b", stop=stop)
  resumed = go("b", resume=True)
  np.testing.assert_array_equal(np.asarray(full.x), np.asarray(resumed.x))
  np.testing.assert_array_equal(np.asarray(full.fitness), np.asarray(resumed.fitness))
  # Its weights are suggested in [0, 1] (the box) and normalized by their sum.
  x = np.asarray(full.x)[N:]
  assert x.min() >= 0 and x.max() <= 1
  np.testing.assert_allclose(np.asarray(full.points)[N:], x / x.sum(-1, keepdims=True),
                             rtol=1e-5)


@pytest.mark.parametrize("strategy", HOST)
def test_host_strategy_warm_start_moves_the_search_to_the_best_seeds(strategy):
  """Warm started, the first generation samples around the best seed (checkpoint 2), not
  around the box's centre, where a cold start samples."""
  fitness = np.array([40.0, 45.0, 70.0, 50.0], np.float32)
  def first(warm):
    cfg = loop.SearchConfig(population_size=8, strategy=strategy, parametrization="box",
                              warm_start=warm)
    s = loop.Search(cfg, N, _two_tasks)
    s.start(s.init(), E, fitness)
    return s.study.ask()
  warm, cold = first(True), first(False)
  assert warm[:, 2].mean() > 0.8 and np.delete(warm, 2, 1).mean() < 0.2
  assert abs(cold.mean() - 0.5) < 0.15
