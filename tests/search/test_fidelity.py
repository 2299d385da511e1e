"""Adaptive fidelity (successive halving) on a problem whose scores average over examples,
and through the CLI with the paper's optimizer on the micro pool."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import search_args
from recycle_jax.evaluation import task_data, task_splits
from recycle_jax import cli
from recycle_jax.search import loop

N, E = 5, 40
TARGET = np.array([0.4, 0.3, 0.2, 0.1, 0.0], np.float32)


def _datas():
  """Two tasks of E examples; example e of a task wants the weights TARGET + noise_e, so a
  subset of the examples estimates the full split's score with an error."""
  rng = np.random.default_rng(0)
  return tuple(task_data.TaskData(tokens=(TARGET + 0.2 * rng.normal(size=(E, N))).astype(
      np.float32), target_mask=np.ones((E, N), bool), name=f"t{t}") for t in range(2))


def _population_fn(alphas, pool, datas):
  s = jnp.stack([100 - 100 * jnp.mean(jnp.sum((alphas[:, None] - d.tokens[None]) ** 2, -1), 1)
                 for d in datas], -1)
  return s, jnp.ones(alphas.shape[0], bool)


def _run(tmp_path=None, name="a", resume=False, population_size=8, budget=64, **kw):
  cfg = loop.SearchConfig(budget=budget, sigma_init=0.3, population_size=population_size,
                            **kw)
  s = loop.Search(cfg, N, _population_fn)
  datas = _datas()
  subset = (tuple(task_splits.subset(d, cfg.fidelity_subset, cfg.seed) for d in datas)
            if cfg.adaptive else None)
  return loop.run(s, None, datas, None if tmp_path is None else str(tmp_path / name),
                    resume=resume, progress=False, subset=subset)


@pytest.mark.parametrize("kw", [{"fidelity_subset": 1.0, "fidelity_promote": 0.25},
                                {"fidelity_subset": 0.5, "fidelity_promote": 1.0}])
def test_full_subset_or_full_promotion_is_the_full_search_bit_for_bit(kw):
  full, other = _run(), _run(**kw)
  np.testing.assert_array_equal(np.asarray(full.x), np.asarray(other.x))
  np.testing.assert_array_equal(np.asarray(full.fitness), np.asarray(other.fitness))
  assert other.full().all()
  # Promoting everyone still pays for the subset pass: the count says so.
  extra = 0 if kw["fidelity_subset"] == 1 else 64 * 2 * E // 2
  assert other.dev_examples() == full.dev_examples() + extra == 64 * 2 * E + extra


def test_adaptive_search_scores_fewer_examples_and_reports_a_full_fidelity_best(tmp_path):
  full = _run()
  ada = _run(fidelity_subset=0.25, fidelity_promote=0.25)
  fid = np.asarray(ada.fidelity)
  assert set(np.round(fid, 4)) == {0.25, 1.0}
  assert (fid == 1).sum() == 8 * 2  # 2 of each generation's 8 promoted
  # 64 subset passes of 10 + 16 full passes of 40 examples per task, vs 64 full passes.
  assert ada.dev_examples() == 2 * (64 * 10 + 16 * 40) == full.dev_examples() // 2
  assert fid[ada.best()] == 1.0
  assert ada.fitness[ada.best()] > float(np.mean(_population_fn(
      jnp.full((1, N), 1 / N), None, _datas())[0])) + 1  # it still improves on uniform
  # A promoted candidate's scores are its full-split scores.
  i = int(np.flatnonzero(fid == 1)[0])
  want = np.asarray(_population_fn(jnp.asarray(ada.points[i])[None], None, _datas())[0])[0]
  np.testing.assert_allclose(ada.scores[i], want, rtol=1e-6)
  # Resume is bit for bit, subsets and promotions included.
  class Stop(Exception):
    pass
  kw = {"fidelity_subset": 0.25, "fidelity_promote": 0.25}
  with pytest.raises(Stop):
    cfg = loop.SearchConfig(budget=64, sigma_init=0.3, population_size=8, **kw)
    datas = _datas()
    loop.run(loop.Search(cfg, N, _population_fn), None, datas, str(tmp_path / "b"),
               progress=False, subset=tuple(task_splits.subset(d, 0.25, 0) for d in datas),
               on_generation=lambda g, a: (_ for _ in ()).throw(Stop()) if g == 2 else None)
  resumed = _run(tmp_path, "b", resume=True, **kw)
  np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(ada.x))
  np.testing.assert_array_equal(np.asarray(resumed.fidelity), fid)


def test_default_promotion_costs_under_a_third_of_the_full_search():
  """The paper's population (12 at N = 16): 2 promoted (1/6, also as gin's 0.1667), and with
  a 0.15 subset the search scores under a third of the full search's dev examples."""
  assert loop.SearchConfig().promoted(12) == loop.SearchConfig(
      fidelity_promote=0.1667).promoted(12) == 2
  ada = _run(population_size=12, budget=12, fidelity_subset=0.15)
  assert (np.asarray(ada.fidelity) == 1).sum() == 2
  # 12 subset passes of 6 + 2 full passes of 40 examples per task, vs 12 full passes.
  assert ada.dev_examples() == 2 * (12 * 6 + 2 * 40) <= 2 * 12 * E / 3


def test_subset_is_fixed_and_refuses_a_bad_fraction():
  d = _datas()[0]
  a, b = task_splits.subset(d, 0.3, 7), task_splits.subset(d, 0.3, 7)
  assert a.num_examples == 12
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, task_splits.subset(d, 0.3, 8).tokens)
  from recycle_jax.runtime.errors import UserError
  with pytest.raises(UserError, match="fidelity_subset"):
    task_splits.subset(d, 0.0, 0)


@pytest.mark.slow  # 20-40 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_cli_adaptive_search_with_the_papers_optimizer(micro_pool, tmp_path):
  wd = tmp_path / "run"
  assert cli.main(search_args(
      micro_pool, wd, "--gin_bindings=SearchConfig.strategy='optuna_cmaes'",
      "--gin_bindings=SearchConfig.parametrization='box'",
      "--gin_bindings=SearchConfig.fidelity_subset=0.5",
      "--gin_bindings=SearchConfig.fidelity_promote=0.3")) == 0
  res = json.load(open(wd / "results.json"))
  hist = [h for h in res["history"] if h["kind"] == "search"]
  assert len(hist) == 14 and {h["fidelity"] for h in hist} == {0.5, 1.0}
  assert sum(h["fidelity"] == 1 for h in hist) == 2 * 3  # ceil(0.3 * 7) per generation
  # 2 tasks of 16 dev examples: 14 subset passes of 8 + 6 full passes of 16, per task.
  assert res["config"]["dev_examples_evaluated"] == 2 * (14 * 8 + 6 * 16)
  assert res["config"]["sigma_init"] == pytest.approx(1 / 6)
  s = res["methods"]["search"]
  row = [h for h in res["history"] if h["weights"] == s["weights"]]
  assert row and row[0]["fidelity"] == 1.0
  assert s["fitness"]["dev"] == pytest.approx(row[0]["fitness"], abs=1e-3)
