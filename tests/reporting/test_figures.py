"""Figures, hypervolume records and repeated-seed summaries on synthetic results (no model)."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from recycle_jax.reporting import records
from recycle_jax.reporting import statistics
from recycle_jax.reporting import figures
from recycle_jax.search import pareto, loop

TASKS = ["rj_code", "rj_math"]
NAMES = ["code", "math", "chat", "mixed"]
POOL = np.array([[60.0, 10.0], [15.0, 55.0], [30.0, 30.0], [40.0, 35.0]])


def _scores(w):
  """A smooth tradeoff: code from checkpoint 0, math from checkpoint 1, a bonus for mixing."""
  w = np.atleast_2d(w)
  mix = 20 * (1 - np.sum(w ** 2, -1))
  return np.stack([w @ POOL[:, 0] + mix, w @ POOL[:, 1] + mix], -1)


def _results(seed=0, n_merges=28):
  rng = np.random.default_rng(seed)
  archive = loop.Archive()
  eye = np.eye(4, dtype=np.float32)
  s = _scores(eye)
  archive.add(eye, eye, s, s.mean(-1), "seed")
  w = rng.dirichlet(np.ones(4), n_merges).astype(np.float32)
  s = _scores(w)
  archive.add(w, w, s, s.mean(-1), "search")
  best = archive.points[archive.best()]
  methods = {"search": records.MethodResult(best, _scores(best)[0],
                                              np.r_[_scores(best)[0] - 2, 5.0])}
  for name, a in {"uniform": np.full(4, 0.25), "best_single": eye[3]}.items():
    methods[name] = records.MethodResult(a, _scores(a)[0], np.r_[_scores(a)[0] - 2, 4.0])
  front = pareto.test_needed(archive, [])
  return records.build_results(records.RunResult(
      TASKS, ["rj_chat_ood"], NAMES, POOL, np.c_[POOL - 2, POOL[:, :1]], methods, archive,
      {"population_size": 7}, front_test=np.c_[_scores(front) - 2, np.zeros(len(front))]))


def test_front_record_and_hypervolumes():
  res = _results()
  par = res["pareto"]
  dev = np.asarray([[f["dev"][t] for t in TASKS] for f in par["front"]])
  assert len(dev) >= 2 and pareto.pareto_mask(dev).all()
  hv = par["hypervolume"]
  assert hv["dev"]["all"] >= hv["dev"]["search"] > 0 and hv["dev"]["all"] >= hv["dev"]["pool"]
  assert hv["dev"]["uniform"] == pytest.approx(np.prod(_scores(np.full(4, 0.25))[0]) / 1e4,
                                               abs=1e-5)
  assert set(hv["test"]) >= {"pool", "search", "all", "uniform"}


def test_seed_summary_is_mean_and_t_interval():
  runs = [_results(s) for s in range(3)]
  out = records.with_seeds(runs[0], runs, ["seed_0", "seed_1", "seed_2"])
  vals = [r["methods"]["search"]["scores"]["test"]["rj_code"] for r in runs]
  got = out["seeds"]["methods"]["search"]["test"]["rj_code"]
  half = stats.t.ppf(0.975, 2) * np.std(vals, ddof=1) / np.sqrt(3)
  assert got["mean"] == pytest.approx(np.mean(vals), abs=1e-3)
  assert got["ci95"] == pytest.approx(half, abs=1e-3) and got["n"] == 3
  assert out["seeds"]["methods"]["uniform"]["fitness"]["test"]["ci95"] == 0
  assert "search" in out["seeds"]["hypervolume"]["dev"]
  md = records.report_markdown(out)
  assert "## Repeated seeds: mean ± 95% CI over 3 seeds" in md and "## Multi-objective" in md
  assert statistics.mean_ci([1.0])[1] != statistics.mean_ci([1.0])[1]  # NaN: no interval


def test_run_figures_are_written_and_linked(tmp_path):
  runs = [_results(s) for s in range(2)]
  res = records.with_seeds(runs[0], runs, ["seed_0", "seed_1"])
  paths = figures.write_run_figures(str(tmp_path), res, runs)
  assert paths == ["figures/pareto.png", "figures/spearman.png", "figures/weights_top5.png",
                   "figures/fitness.png"]
  for p in paths:
    assert os.path.getsize(tmp_path / p) > 5000
  res["figures"] = paths
  records.write_report(str(tmp_path), res)
  assert "![pareto](figures/pareto.png)" in open(tmp_path / "report.md").read()


def test_top_n_ablation_and_pool_figure(tmp_path):
  runs = []
  for n in (2, 4):
    r = _results()
    r["pool"] = r["pool"][:n]
    path = tmp_path / f"top{n}.json"
    path.write_text(json.dumps(r))
    runs.append(str(path))
  out = figures.top_n_ablation(runs, str(tmp_path / "topn.png"))
  assert os.path.getsize(out) > 5000
  manifest = {"checkpoints": [{"name": n, "path": f"ck/{n}", "scores": {"test": {
      "rj_code": float(c), "rj_math": float(m), "rj_chat_ood": 1.0}}}
      for n, (c, m) in zip(NAMES, POOL)]}
  (tmp_path / "pool.json").write_text(json.dumps(manifest))
  (tmp_path / "pool_report.md").write_text("# Pool report\n")
  assert figures.pool_figures(str(tmp_path)) == ["figures/spearman.png"]
  assert "![Spearman](figures/spearman.png)" in (tmp_path / "pool_report.md").read_text()
  figures.pool_figures(str(tmp_path))  # idempotent: linked once
  assert (tmp_path / "pool_report.md").read_text().count("figures/spearman.png") == 1
