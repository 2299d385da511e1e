"""A candidate whose merge is not finite gets the worst fitness, is logged, and the search
goes on, end to end through `recycle-jax search`.

How NaN candidates are made: a linear merge of finite checkpoints is a convex combination,
so it is always finite; and a checkpoint holding NaN/Inf poisons every merge (0 * NaN is
NaN), which is bad input, rejected up front (test_bad_inputs). Non-finite *candidates* come
from merges that extrapolate (task arithmetic, TIES, DARE rescaling: an overflow in a
low-precision dtype for some hyperparameters only). Here the population function reports
every merge dominated by checkpoint `a` (weight > 0.5) as non-finite, as such an overflow
would, through the same `finite` flag that merge and evaluation compute in one program.
"""
import json
import logging

import pytest

from recycle_jax import cli
from recycle_jax.search import population
from reliability_util import tiny_search_args
from reliability_util import tiny_pool  # noqa: F401 fixture


def _diverging_above_half(make_population_fn):
  def make(*args, **kwargs):
    fn = make_population_fn(*args, **kwargs)

    def population_fn(alphas, pool, datas):
      scores, finite = fn(alphas, pool, datas)
      return scores, finite & (alphas[:, 0] <= 0.5)
    return population_fn
  return make


def _strict(constant):
  raise ValueError(f"results.json holds {constant}: not valid JSON")


def test_nan_candidates_get_the_worst_fitness_are_logged_and_the_search_goes_on(
    tiny_pool, tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(population, "make_population_fn",
                      _diverging_above_half(population.make_population_fn))
  caplog.set_level(logging.WARNING)
  workdir = tmp_path / "run"
  assert cli.main(tiny_search_args(tiny_pool, workdir,
                                   "--gin_bindings=Experiment.save_merged=False")) == 0
  res = json.loads((workdir / "results.json").read_text(), parse_constant=_strict)
  searched = [h for h in res["history"] if h["kind"] == "search"]
  assert len(searched) == 28  # every generation ran
  diverged = [h for h in searched if h["weights"][0] > 0.5]
  assert 0 < len(diverged) < len(searched)
  assert any(h["fitness"] is not None for h in searched[-7:])  # still finite at the end
  for h in res["history"]:
    nan = h["weights"][0] > 0.5
    assert (h["fitness"] is None) == nan, h
    assert all((s is None) == nan for s in h["scores"].values()), h
  best = res["methods"]["search"]
  assert best["weights"][0] <= 0.5 and best["fitness"]["dev"] is not None
  assert best["fitness"]["dev"] == pytest.approx(
      max(h["fitness"] for h in res["history"] if h["fitness"] is not None), abs=1e-3)
  warned = [r.getMessage() for r in caplog.records if "given the worst fitness" in
            r.getMessage()]
  assert len(warned) >= len(diverged)
