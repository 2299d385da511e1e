"""Sweeps (product/zipit, local parallel trials, aggregate table), the TensorBoard scalars
each trial writes, and `recycle-jax report` rebuilding a trial's report.md."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from recycle_jax import cli, sweeps
from recycle_jax.reporting import metrics
from recycle_jax.runtime.errors import UserError

SWEEP_PY = os.path.join(ROOT, "experiments", "sweep.py")


# ----------------------------------------------------------------------------- algebra

def test_product_and_zipit_like_xmanager_hyper():
  a, b = sweeps.sweep("A.x", [1, 2]), sweeps.sweep("B.y", ["u", "v"])
  assert sweeps.product(a, b) == [{"A.x": 1, "B.y": "u"}, {"A.x": 1, "B.y": "v"},
                                  {"A.x": 2, "B.y": "u"}, {"A.x": 2, "B.y": "v"}]
  assert sweeps.zipit(a, b) == [{"A.x": 1, "B.y": "u"}, {"A.x": 2, "B.y": "v"}]
  assert sweeps.product(sweeps.sweep("C.z", [0]), sweeps.zipit(a, b))[1] == \
      {"C.z": 0, "A.x": 2, "B.y": "v"}
  with pytest.raises(UserError, match="same number of values"):
    sweeps.zipit(a, sweeps.sweep("C.z", [1, 2, 3]))


def test_bindings_are_gin_literals_and_references_stay_raw():
  assert sweeps.binding("SearchConfig.strategy", "SNES") == "SearchConfig.strategy='SNES'"
  assert sweeps.binding("Experiment.tasks", ["a", "b"]) == "Experiment.tasks=['a', 'b']"
  assert sweeps.binding("make_pool.model", "@micro/ModelConfig()") == \
      "make_pool.model=@micro/ModelConfig()"


def test_named_sweep_and_unknown_sweep(tmp_path):
  spec = sweeps.load_spec("micro", ["Experiment.pool='p.json'"])
  assert len(spec.trials) == 4 and spec.bindings[-1] == "Experiment.pool='p.json'"
  with pytest.raises(UserError, match="unknown sweep 'nope'.*micro"):
    sweeps.load_spec("nope")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"bindings": []}))
  with pytest.raises(UserError, match="defines no trials"):
    sweeps.load_spec(str(bad))


# ----------------------------------------------------------------------------- running

@pytest.fixture(scope="module")
def swept(micro_pool, tmp_path_factory):
  """A 2-trial sweep on the micro pool, run by experiments/sweep.py with --parallel=2."""
  base = tmp_path_factory.mktemp("sweep")
  spec = {"bindings": [f"Experiment.pool={micro_pool!r}",
                       "Experiment.tasks=['rj_code', 'rj_knowledge']",
                       "Experiment.max_examples=8", "Experiment.save_merged=False",
                       "SearchConfig.budget=7"],
          "zipit": {"SearchConfig.seed": [0, 1], "SearchConfig.sigma_init": [1.0, 0.5]}}
  (base / "tiny.json").write_text(json.dumps(spec))
  workdir = base / "w"
  proc = subprocess.run([sys.executable, SWEEP_PY, f"--sweep={base / 'tiny.json'}",
                         f"--workdir={workdir}", "--parallel=2"],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(
      open(p).read()[-2000:] for p in glob.glob(str(workdir / "*.log")))
  return base, workdir, proc.stdout


@pytest.mark.slow  # a real sweep of searches: `make test-slow` (CI)
def test_sweep_runs_trials_and_writes_one_table(swept):
  _, workdir, stdout = swept
  assert "trial_0: done" in stdout and "trial_1: done" in stdout
  rows = json.load(open(workdir / "sweep.json"))
  assert [r["bindings"] for r in rows] == [
      {"SearchConfig.seed": 0, "SearchConfig.sigma_init": 1.0},
      {"SearchConfig.seed": 1, "SearchConfig.sigma_init": 0.5}]
  for r in rows:
    assert r["status"] == "done" and r["merges_evaluated"] == 7
    assert set(r["fitness"]) == set(sweeps.REPORT_METHODS)
    res = json.load(open(os.path.join(r["workdir"], "results.json")))
    assert r["fitness"]["search"] == res["methods"]["search"]["fitness"]
  table = open(workdir / "sweep.md").read()
  assert "| trial | seed | sigma_init | status | search dev |" in table
  assert table.count("| done |") == 2
  config = open(workdir / "trial_1" / "config.gin").read()
  assert "SearchConfig.seed = 1" in config and "sigma_init = 0.5" in config


@pytest.mark.slow  # a real sweep of searches: `make test-slow` (CI)
def test_finished_trials_are_skipped_and_a_changed_sweep_is_refused(swept):
  base, workdir, _ = swept
  before = os.path.getmtime(workdir / "trial_0" / "results.json")
  assert sweeps.run_local(sweeps.load_spec(str(base / "tiny.json")), str(workdir), 2) == \
      {0: "done (skipped)", 1: "done (skipped)"}
  assert os.path.getmtime(workdir / "trial_0" / "results.json") == before
  other = base / "other.json"
  other.write_text(json.dumps({"trials": [{"SearchConfig.seed": 5}]}))
  with pytest.raises(UserError, match="holds a different sweep"):
    sweeps.run_local(sweeps.load_spec(str(other)), str(workdir))


@pytest.mark.slow  # a real sweep of searches: `make test-slow` (CI)
def test_each_trial_writes_tensorboard_scalars(swept):
  _, workdir, _ = swept
  scalars = read_scalars(workdir / "trial_0" / metrics.TB_DIR)
  res = json.load(open(workdir / "trial_0" / "results.json"))
  assert len(scalars["fitness/best_so_far"]) == len(res["history"])
  assert len(scalars["generation/best"]) == 1  # budget 7 = one generation of 7
  assert max(scalars["fitness/best_so_far"].values()) == pytest.approx(
      res["methods"]["search"]["fitness"]["dev"], abs=1e-3)


@pytest.mark.slow  # a real sweep of searches: `make test-slow` (CI)
def test_report_rebuilds_report_md_from_results(swept, capsys):
  _, workdir, _ = swept
  trial = workdir / "trial_0"
  original = open(trial / "report.md").read()
  os.remove(trial / "report.md")
  assert cli.main(["report", str(trial)]) == 0
  assert open(trial / "report.md").read() == original
  assert cli.main(["report", str(workdir)]) == 2  # the sweep dir has no results.json
  assert "results.json not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- metrics

def read_scalars(logdir) -> dict[str, dict[int, float]]:
  import tensorflow as tf
  out: dict = {}
  for path in glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_write_history_scalars_per_evaluation_and_generation(tmp_path):
  hist = [{"fitness": f, "kind": k} for f, k in
          [(0.2, "seed"), (0.1, "search"), (None, "search"), (0.4, "search"), (0.3, "search")]]
  results = {"history": hist, "config": {"population_size": 2},
             "methods": {"search": {"fitness": {"dev": 0.4, "test": None}}}}
  metrics.write_history(str(tmp_path), results)
  metrics.write_history(str(tmp_path), results)  # rewritten, not appended
  assert len(os.listdir(tmp_path / metrics.TB_DIR)) == 1
  s = read_scalars(tmp_path / metrics.TB_DIR)
  assert s["fitness/best_so_far"] == pytest.approx({0: 0.2, 1: 0.2, 3: 0.4, 4: 0.4})
  assert s["fitness/search"] == pytest.approx({1: 0.1, 3: 0.4, 4: 0.3})
  assert s["generation/best"] == pytest.approx({0: 0.1, 1: 0.4})
  assert s["generation/mean"] == pytest.approx({0: 0.1, 1: 0.35})
  assert s["methods/search/dev"] == pytest.approx({0: 0.4})
