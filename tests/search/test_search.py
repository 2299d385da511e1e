"""CMA-ES on a constructed problem with a known optimum, determinism and resume."""
import jax.numpy as jnp
import numpy as np
import pytest

from recycle_jax.search import loop

TARGET = np.array([0.5, 0.3, 0.2, 0.0, 0.0, 0.0], np.float32)


def _population_fn(alphas, pool, datas):
  """Two 'tasks' whose average peaks at TARGET (100 there)."""
  d = jnp.sum((alphas - TARGET) ** 2, -1)
  scores = jnp.stack([100 - 100 * d, 100 - 120 * d], -1)
  return scores, jnp.ones(alphas.shape[0], bool)


def _search(budget=300, seed=0, **kw):
  cfg = loop.SearchConfig(budget=budget, seed=seed, sigma_init=0.3, **kw)
  return loop.Search(cfg, len(TARGET), _population_fn)


def _fitness(alphas):
  return float(np.asarray(_population_fn(jnp.asarray(alphas)[None], None, None)[0]).mean())


def test_search_finds_the_known_optimum_better_than_uniform():
  archive = loop.run(_search(), None, None, workdir=None, progress=False)
  best = archive.best()
  uniform = _fitness(np.full(6, 1 / 6, np.float32))
  assert archive.fitness[best] > uniform + 5
  assert archive.fitness[best] > 99.0
  np.testing.assert_allclose(archive.points[best], TARGET, atol=0.08)
  assert len(archive) == 300 // _search().pop * _search().pop


def test_population_size_defaults_to_the_paper():
  assert loop.SearchConfig().pop_size(16) == 12
  assert loop.SearchConfig().pop_size(2) == 6


def test_search_is_deterministic_for_a_seed():
  a = loop.run(_search(60, seed=3), None, None, workdir=None, progress=False)
  b = loop.run(_search(60, seed=3), None, None, workdir=None, progress=False)
  c = loop.run(_search(60, seed=4), None, None, workdir=None, progress=False)
  np.testing.assert_array_equal(np.asarray(a.points), np.asarray(b.points))
  assert not np.array_equal(np.asarray(a.points), np.asarray(c.points))


def test_resume_after_interruption_reaches_the_same_result(tmp_path):
  full = loop.run(_search(80), None, None, workdir=str(tmp_path / "a"), progress=False)

  class Stop(Exception):
    pass

  def stop_after_two(g, archive):
    if g == 1:
      raise Stop
  with pytest.raises(Stop):
    loop.run(_search(80), None, None, workdir=str(tmp_path / "b"), progress=False,
               on_generation=stop_after_two)
  resumed = loop.run(_search(80), None, None, workdir=str(tmp_path / "b"), resume=True,
                       progress=False)
  np.testing.assert_array_equal(np.asarray(full.points), np.asarray(resumed.points))
  np.testing.assert_array_equal(np.asarray(full.fitness), np.asarray(resumed.fitness))


def test_resume_refuses_a_changed_config_but_extends_the_budget(tmp_path):
  from recycle_jax.runtime.errors import UserError
  wd = str(tmp_path / "run")
  first = loop.run(_search(40), None, None, workdir=wd, progress=False)
  with pytest.raises(UserError, match=r"saved search has search\.seed = 0, this config 4"):
    loop.run(_search(40, seed=4), None, None, workdir=wd, resume=True, progress=False)
  with pytest.raises(UserError, match=r"search\.strategy"):
    loop.run(_search(40, strategy="SNES"), None, None, workdir=wd, resume=True,
               progress=False)
  longer = loop.run(_search(80), None, None, workdir=wd, resume=True, progress=False)
  full = loop.run(_search(80), None, None, workdir=str(tmp_path / "full"), progress=False)
  assert len(longer) > len(first)
  np.testing.assert_array_equal(np.asarray(longer.points), np.asarray(full.points))


def test_nan_candidates_get_the_worst_fitness_and_the_search_continues():
  def nan_fn(alphas, pool, datas):
    scores, finite = _population_fn(alphas, pool, datas)
    return scores, finite.at[0].set(False)  # first candidate of each generation "diverges"
  s = loop.Search(loop.SearchConfig(budget=60, sigma_init=0.3), 6, nan_fn)
  archive = loop.run(s, None, None, workdir=None, progress=False)
  f = np.asarray(archive.fitness)
  assert np.isnan(f[::s.pop]).all() and np.isfinite(np.delete(f, np.s_[::s.pop])).all()
  assert np.isfinite(archive.fitness[archive.best()])


def test_warm_start_seeds_enter_the_archive_and_steer_the_strategy():
  seeds_a = np.eye(6, dtype=np.float32)
  seeds_s = np.asarray(_population_fn(jnp.asarray(seeds_a), None, None)[0])
  seeds = loop.Seeds.of(_search(0).space, seeds_a, seeds_s)
  warm = loop.run(_search(24, warm_start=True), None, None, None, seeds=seeds,
                    progress=False)
  cold = loop.run(_search(24), None, None, None, seeds=seeds, progress=False)
  assert warm.kind[:6] == ["seed"] * 6 and len(warm) == 6 + 24 // 9 * 9
  assert not np.array_equal(np.asarray(warm.points[6:]), np.asarray(cold.points[6:]))


def test_states_saved_with_the_old_archive_key_still_load():
  """Before the space's points were `points`, saved states held them as `alphas`."""
  a = loop.run(_search(24), None, None, workdir=None, progress=False)
  old = {"archive": {("alphas" if k == "points" else k): v for k, v in a.arrays().items()}}
  b = loop.Archive.from_arrays(loop.saved_archive(old))
  np.testing.assert_array_equal(np.asarray(a.points), np.asarray(b.points))
  np.testing.assert_array_equal(np.asarray(a.fitness), np.asarray(b.fitness))
