"""IRT fitness: the 2PL fit, Fisher-information items and gp-IRT estimates on synthetic
responses drawn from a known 2PL model, and a search through the CLI on the micro pool
(per-item scores equal the run's scores; the estimates cost a fraction of the dev split;
the returned merge is full fidelity; a subset larger than a split is refused)."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import search_args
from recycle_jax import cli
from recycle_jax.evaluation import irt, task_data
from recycle_jax.merging import spaces
from recycle_jax.search import irt_fitness, population

E, M = 300, 24


def _model(seed=0):
  rng = np.random.default_rng(seed)
  a, b = np.exp(rng.normal(0, 0.5, E)), rng.normal(0, 1.5, E)
  draw = lambda theta: (rng.random((len(theta), E)) < np.asarray(  # noqa: E731
      irt.prob(jnp.asarray(theta), a, b))).astype(np.float32)
  return a, b, rng, draw


def test_fit_recovers_a_known_2pl_model():
  a, b, rng, draw = _model()
  theta = rng.normal(0, 1, M)
  fa, fb, ft = irt.fit(draw(theta))
  assert np.corrcoef(ft, theta)[0, 1] > 0.95
  assert np.corrcoef(fb, b)[0, 1] > 0.8


def test_fisher_items_and_gp_irt_beat_a_random_subset_of_the_same_size():
  a, b, rng, draw = _model(1)
  calib = draw(rng.normal(0, 1, M))
  fitted = irt.fit(calib)
  k = 20
  chosen = irt.choose(*fitted, k)
  info = np.asarray(irt.fisher(jnp.asarray(fitted[2]), fitted[0], fitted[1])).sum(0)
  assert set(chosen) == set(np.argsort(-info)[:k]) and list(chosen) == sorted(chosen)
  items = irt.calibrate(calib, chosen, fitted)
  assert 0.0 <= float(items.lam) <= 1.0
  new = draw(rng.normal(0.3, 0.8, 200))  # candidates the fit never saw
  truth = new.mean(-1)
  est = np.asarray(irt.estimate(jnp.asarray(new[:, chosen]), items))
  rand = np.sort(rng.choice(E, k, replace=False))
  naive = np.asarray(irt.estimate(jnp.asarray(new[:, rand]), irt.plain_mean(E, rand)))
  np.testing.assert_allclose(naive, new[:, rand].mean(-1), rtol=1e-6)
  err, err_naive = np.abs(est - truth).mean(), np.abs(naive - truth).mean()
  assert err < 0.75 * err_naive, (err, err_naive)


def test_every_item_seen_is_the_plain_mean():
  a, b, rng, draw = _model(2)
  calib = draw(rng.normal(0, 1, M))
  fitted = irt.fit(calib)
  items = irt.calibrate(calib, np.arange(E), fitted)
  np.testing.assert_allclose(np.asarray(irt.estimate(jnp.asarray(calib), items)),
                             calib.mean(-1), rtol=1e-5)


def _item_hits(params, datas):
  """(params, datas) -> [sum E] hits: item j of a split is right when the merge's first
  leaf, summed, exceeds the item's difficulty (its first token): a per-item program over
  real TaskData, as `irt.item_scorer` is one over a decoder."""
  s = jnp.sum(jax.tree.leaves(params)[0])
  return jnp.concatenate([(s > d.tokens[:, 0]).astype(jnp.float32) for d in datas])


def test_the_calibration_is_scored_once_per_run_not_once_per_search(caplog):
  """Every search of a run (each seed, Fisher and random items) calibrates on the same
  seeds: the run's cached per-item scorer scores them once and compiles once; each search
  keeps its own responses (a promotion joins only its own)."""
  rng = np.random.default_rng(0)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  pool = jax.device_put(tuple({"w": rng.normal(size=(3, 3)).astype(np.float32)}
                              for _ in range(4)), jax.devices()[0])
  programs = population.Programs(_item_hits, pool, None, mesh, lambda params, size: "map",
                                 items=_item_hits)
  dev = tuple(task_data.TaskData(tokens=rng.normal(0, 3, (e, 1)).astype(np.float32),
                                 target_mask=np.ones((e, 1), bool), name=f"t{e}")
              for e in (10, 7))
  space = spaces.MergeSpace(n=4)
  seeds = np.concatenate([np.eye(4), np.full((1, 4), 0.25)]).astype(np.float32)
  merged = lambda w: jax.tree.map(lambda *x: sum(a * b for a, b in zip(w, x)), *pool)  # noqa
  truth = np.stack([np.asarray(_item_hits(merged(w), dev)) for w in seeds])
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    cals = [irt_fitness.Calibration(programs.item_scorer(space, 3), dev, dev, mesh, 3, sel)
            for sel in ("fisher", "random", "fisher")]
    for c in cals:
      c.score(seeds)
  compiled = [r for r in caplog.records if "Compiling jit(population)" in r.getMessage()]
  items = programs.item_scorer(space, 3)
  assert len(compiled) == 1 and all(c.items is items for c in cals)
  assert items.hits == 2 * len(seeds)  # the second and third search: all cached
  for c in cals:
    got = np.concatenate(c.responses, axis=1)
    np.testing.assert_array_equal(got, truth)
  # a promotion: a new point and a diverged one, into the first search's calibration only
  new = np.asarray([[0.1, 0.2, 0.3, 0.4], [np.nan] * 4], np.float32)
  scores, finite = cals[0].score(new)
  assert list(finite) == [True, False] and np.isnan(scores[1]).all()
  hits = np.asarray(_item_hits(merged(new[0]), dev))
  np.testing.assert_allclose(scores[0], [100 * hits[:10].mean(), 100 * hits[10:].mean()],
                             rtol=1e-6)
  assert [len(r) for r in cals[0].responses] == [len(seeds) + 1] * 2  # the finite one
  assert [len(r) for r in cals[1].responses] == [len(seeds)] * 2


DEVICE_TASKS = "--gin_bindings=Experiment.tasks=['rj_instruct', 'rj_knowledge']"


@pytest.mark.slow
@pytest.mark.parametrize("select", ["fisher", "random"])
def test_cli_irt_search(micro_pool, tmp_path, select):
  wd = tmp_path / "run"
  assert cli.main(search_args(
      micro_pool, wd, DEVICE_TASKS, "--gin_bindings=SearchConfig.irt_items=4",
      f"--gin_bindings=SearchConfig.irt_select='{select}'",
      "--gin_bindings=SearchConfig.population_size=7")) == 0
  res = json.load(open(wd / "results.json"))
  hist = [h for h in res["history"] if h["kind"] == "search"]
  assert len(hist) == 14 and {h["fidelity"] for h in hist} == {0.25, 1.0}
  assert sum(h["fidelity"] == 1 for h in hist) == 1  # generation 2 of 2: one promoted
  # 2 tasks of 16 dev examples: 14 passes over 4 items, 1 full pass, per task
  assert res["config"]["dev_examples_evaluated"] == 2 * (14 * 4 + 16)
  s = res["methods"]["search"]
  full = [h for h in res["history"] if h["fidelity"] == 1.0]
  assert s["weights"] in [h["weights"] for h in full]  # the returned merge: full fidelity
  # the promoted candidate's scores (means of its per-item hits) are the run's scorer's:
  # its test scores come from the ordinary scorer, its dev scores from the items
  row = [h for h in hist if h["fidelity"] == 1.0][0]
  if row["weights"] == s["weights"]:
    assert s["fitness"]["dev"] == pytest.approx(row["fitness"], abs=1e-3)


def test_an_irt_subset_larger_than_the_split_is_one_line(micro_pool, tmp_path, capsys):
  for items, words in ((17, "larger than task 'rj_instruct'"), (4, "verified on the host")):
    tasks = (DEVICE_TASKS,) if items == 17 else ()
    assert cli.main(search_args(micro_pool, tmp_path / "run", *tasks,
                                f"--gin_bindings=SearchConfig.irt_items={items}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()
