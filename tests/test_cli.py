"""End to end through the CLI on the micro pool: search, merge, eval, and bad input."""
import json

import numpy as np
import pytest

from conftest import search_args
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax import cli


@pytest.fixture
def searched(micro_search):
  return micro_search


def test_search_writes_results_report_config_and_merged(searched):
  res = json.load(open(searched / "results.json"))
  assert res["tasks"] == ["rj_code", "rj_knowledge"]
  assert (res["runtime"]["backend"], res["runtime"]["device_count"]) == ("cpu", 8)
  assert {"search", "uniform", "merge_best", "best_single"} <= set(res["methods"])
  for name in ("search", "uniform", "merge_best", "best_single"):
    m = res["methods"][name]
    assert len(m["weights"]) == 3 and abs(sum(m["weights"]) - 1) < 1e-4
    assert set(m["scores"]["dev"]) == {"rj_code", "rj_knowledge"}
    assert set(m["scores"]["test"]) == {"rj_code", "rj_knowledge", "rj_math"}
    assert m["fitness"]["dev"] == pytest.approx(np.mean(list(m["scores"]["dev"].values())),
                                                abs=1e-3)
  assert [p["name"] for p in res["pool"]] == ["code", "math", "instruct_dpo"]
  search_hist = [h for h in res["history"] if h["kind"] == "search"]
  assert len(search_hist) == 14 // 7 * 7
  # The search result is the best evaluated merge, so never below the seeds it was given.
  best = max(h["fitness"] for h in res["history"] if h["fitness"] is not None)
  assert res["methods"]["search"]["fitness"]["dev"] == pytest.approx(best, abs=1e-3)
  assert res["methods"]["search"]["fitness"]["dev"] >= res["methods"]["uniform"]["fitness"]["dev"]
  report = open(searched / "report.md").read()
  assert "| search |" in report and "| merge_best |" in report
  assert "Experiment.tasks" in open(searched / "config.gin").read()
  meta = checkpoints.read_metadata(str(searched / "merged"))
  merge = meta.custom["recycle_jax"]["merge"]
  assert merge["pool"] == ["code", "math", "instruct_dpo"]
  np.testing.assert_allclose(merge["weights"], res["methods"]["search"]["weights"], atol=1e-5)


def test_merge_then_eval_reproduces_the_search_scores(searched, micro_pool, tmp_path):
  res = json.load(open(searched / "results.json"))
  w = ",".join(str(x) for x in res["methods"]["uniform"]["weights"])
  out = tmp_path / "merged"
  assert cli.main(["merge", f"--pool={micro_pool}", f"--weights={w}", f"--output={out}"]) == 0
  scores = tmp_path / "scores.json"
  assert cli.main(["eval", f"--checkpoint={out}", "--tasks=rj_code,rj_knowledge",
                   "--split=test", "--max_examples=16", f"--output={scores}"]) == 0
  got = json.load(open(scores))["scores"]
  assert json.load(open(scores))["runtime"]["process_count"] == 1
  for t, v in res["methods"]["uniform"]["scores"]["test"].items():
    if t in got:
      assert got[t] == pytest.approx(v, abs=1e-3)


def _fails(args, capsys, match):
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_bad_input_gives_one_line_and_writes_nothing(micro_pool, tmp_path, capsys):
  out = tmp_path / "out"
  _fails(["merge", f"--pool={micro_pool}", "--weights=1,2", f"--output={out}"], capsys,
         "got 2 weights for a pool of 3")
  _fails(["merge", f"--pool={tmp_path}/missing.json", "--weights=1", f"--output={out}"],
         capsys, "pool manifest not found")
  _fails(["merge", f"--pool={micro_pool}", "--method=frobnicate", f"--output={out}"], capsys,
         "unknown merge method 'frobnicate'")
  _fails(["merge", f"--pool={micro_pool}", "--density=0.3", f"--output={out}"], capsys,
         "--method=linear takes no --density")
  _fails(search_args(micro_pool, out, "--gin_bindings=Experiment.tasks=['rj_nope']"),
         capsys, "unknown task 'rj_nope'")
  _fails(search_args(micro_pool, out, "--gin_bindings=SearchConfig.budgett=3"), capsys,
         "invalid gin config")
  _fails(search_args(micro_pool, out, "--gin_file=/nonexistent.gin"), capsys,
         "gin file not found")
  assert not out.exists()


def test_resume_with_a_changed_config_is_refused_and_changes_nothing(micro_search, micro_pool,
                                                                     capsys):
  from reliability.reliability_util import snapshot
  before = snapshot(micro_search)
  _fails(search_args(micro_pool, micro_search, "--resume",
                     "--gin_bindings=SearchConfig.seed=7"), capsys,
         "cannot resume: the saved search has search.seed = 0, this config 7")
  assert snapshot(micro_search) == before


def test_info_logging_keeps_every_recycle_jax_package_and_drops_other_info():
  import logging as pylogging
  from recycle_jax.search import loop

  def record(path, level=pylogging.INFO):
    return pylogging.LogRecord("absl", level, path, 1, "m", None, None)
  keep = cli._INFO_FILTER.filter
  assert keep(record(loop.__file__))  # a subpackage's INFO (the resume line) is shown
  assert keep(record(cli.__file__))
  assert not keep(record(np.__file__))  # other libraries' INFO (Orbax's saves) is not
  assert keep(record(np.__file__, pylogging.WARNING))
