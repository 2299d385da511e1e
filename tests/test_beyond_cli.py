"""End to end on the micro pool: repeated seeds, task-vector and greedy-soup baselines, a
Pareto sweep, hypervolumes and figures; `merge --method=...` with a base checkpoint."""
import json
import os

import numpy as np
import pytest

from conftest import search_args
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax import cli

pytestmark = pytest.mark.slow  # end-to-end CLI runs: `make test-slow` (CI)


@pytest.fixture(scope="module")
def base(micro_pool):
  return os.path.join(os.path.dirname(micro_pool), "base")  # written by make-pool


@pytest.fixture(scope="module")
def searched(micro_pool, base, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("beyond") / "run"
  assert cli.main(search_args(
      micro_pool, workdir, "--num_seeds=2", f"--gin_bindings=Experiment.base={base!r}",
      "--gin_bindings=Experiment.save_merged=False",
      "--gin_bindings=task_vector_baselines.methods=['ties']",
      "--gin_bindings=task_vector_baselines.lams=[1.0]",
      "--gin_bindings=SweepConfig.num_weights=1",
      "--gin_bindings=SweepConfig.scalarizations=['chebyshev']",
      "--gin_bindings=SweepConfig.budget=7", budget=7)) == 0
  return workdir


def test_repeated_seeds_baselines_pareto_and_figures(searched):
  res = json.load(open(searched / "results.json"))
  for k in (0, 1):
    run = json.load(open(searched / f"seed_{k}" / "results.json"))
    assert run["config"]["search"]["seed"] == k
    assert len([h for h in run["history"] if h["kind"] == "search"]) == 7
  seeds = res["seeds"]
  assert seeds["num_seeds"] == 2 and seeds["runs"] == ["seed_0", "seed_1"]
  s = seeds["methods"]["search"]["test"]["rj_code"]
  assert s["n"] == 2 and s["ci95"] is not None
  assert seeds["methods"]["uniform"]["fitness"]["dev"]["ci95"] == 0  # seed-independent
  m = res["methods"]
  assert m["ties"]["merge"] == {"merge_space": "ties", "method": "ties",
                                "hparams": {"lam": 1.0, "density": 0.5}}
  assert m["greedy_soup"]["merge"]["ingredients"][0] in ("code", "math", "instruct_dpo")
  # The greedy soup is a seed of the search, so the search never ends below it on dev.
  assert m["search"]["fitness"]["dev"] >= m["greedy_soup"]["fitness"]["dev"]
  par = res["pareto"]
  assert [(p["scalarization"], p["task_weights"]) for p in par["sweep"]] == [
      ("chebyshev", [0.5, 0.5])]
  assert len(par["evaluated"]) == 7 and par["front"]
  for split in ("dev", "test"):
    hv = par["hypervolume"][split]
    assert {"pool", "search", "all", "uniform", "ties"} <= set(hv)
    assert all(0 <= v <= 1 for v in hv.values())
  assert 0 <= seeds["hypervolume"]["dev"]["all"]["mean"] <= 1
  report = open(searched / "report.md").read()
  assert "## Repeated seeds: mean ± 95% CI over 2 seeds" in report
  assert "| ties |" in report and "hypervolume" in report
  for f in ("pareto", "weights_top5", "fitness", "spearman"):
    assert f"figures/{f}.png" in report
    assert os.path.getsize(searched / "figures" / f"{f}.png") > 5000


def test_merge_with_task_vector_and_layerwise_methods(micro_pool, base, tmp_path, capsys):
  out = tmp_path / "ties"
  assert cli.main(["merge", f"--pool={micro_pool}", "--method=ties", f"--base={base}",
                   "--lam=0.8", "--density=0.3", f"--output={out}"]) == 0
  merge = checkpoints.read_metadata(str(out)).custom["recycle_jax"]["merge"]
  assert merge["method"] == "ties" and merge["space"]["hparams"] == {"lam": 0.8, "density": 0.3}
  np.testing.assert_allclose(merge["weights"], [1 / 3] * 3, rtol=1e-5)
  out = tmp_path / "lw"
  w = ",".join(["1,0,0"] * 2 + ["0,1,1"] * 2)  # embed, layer_0, layer_1, final
  assert cli.main(["merge", f"--pool={micro_pool}", "--method=layerwise", f"--weights={w}",
                   f"--output={out}"]) == 0
  merge = checkpoints.read_metadata(str(out)).custom["recycle_jax"]["merge"]
  assert merge["space"]["group_weights"] == [[1, 0, 0], [1, 0, 0], [0, 0.5, 0.5],
                                             [0, 0.5, 0.5]]
  assert cli.main(["merge", f"--pool={micro_pool}", "--method=dare_ties",
                   f"--output={tmp_path / 'x'}"]) == 2
  assert "needs the base checkpoint" in capsys.readouterr().err
  assert cli.main(["merge", f"--pool={micro_pool}", "--method=layerwise", "--weights=1,1,1",
                   f"--output={tmp_path / 'x'}"]) == 2
  assert "got 3 weights for 4 layer groups" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
