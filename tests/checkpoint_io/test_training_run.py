"""A training run's steps as a pool: real CheckpointManager directories in the layouts
MaxText, t5x and Orbax's default write; the step selection; LAWA and EMA against numpy;
the bad inputs (one line, exit 2, nothing written)."""
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from recycle_jax import cli
from recycle_jax.checkpoint_io import checkpoints, pool_manifest, training_run
from recycle_jax.runtime.errors import UserError
from recycle_jax.search import baselines


def _params(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"embed": rng.normal(size=(6, 4)).astype(np.float32),
          "layer_0": {"w": rng.normal(size=(4, 4)).astype(np.float32)}}


def _maxtext_run(d, steps=(10, 20, 30), tree=None) -> str:
  """MaxText's layout: RUN/<step>/items, a TrainState whose params are flax's
  {'params': {...}}, with the optimizer state beside them."""
  mngr = ocp.CheckpointManager(str(d), item_names=("items",),
                               options=ocp.CheckpointManagerOptions(create=True))
  for s in steps:
    p = (tree or _params)(s)
    state = {"params": {"params": p}, "opt_state": {"mu": p, "nu": p}, "step": np.int64(s)}
    mngr.save(s, args=ocp.args.Composite(items=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  mngr.close()
  return str(d)


def _t5x_run(d, steps=(1, 2)) -> str:
  """t5x's Orbax manager: RUN/checkpoint_<step>/state, params under 'target'."""
  mngr = ocp.CheckpointManager(str(d), item_names=("state",), options=ocp.CheckpointManagerOptions(
      create=True, step_prefix="checkpoint"))
  for s in steps:
    state = {"target": _params(s), "state": {"step": np.int64(s)}}
    mngr.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  mngr.close()
  return str(d)


def _default_run(d, steps=(5, 6, 7)) -> str:
  """Orbax's single-item default: RUN/<step>/default holding the parameters themselves,
  written by recycle_jax's own writer of MaxText's layout being absent here."""
  mngr = ocp.CheckpointManager(str(d), options=ocp.CheckpointManagerOptions(create=True))
  for s in steps:
    mngr.save(s, args=ocp.args.StandardSave(_params(s)))
  mngr.wait_until_finished()
  mngr.close()
  return str(d)


@pytest.mark.parametrize("layout, steps, subtree, item", [
    (_maxtext_run, (10, 20, 30), ("params", "params"), "items"),
    (_t5x_run, (1, 2), ("target",), "state"),
    (_default_run, (5, 6, 7), (), "default"),
])
def test_reads_each_layout_and_restores_only_the_parameters(layout, steps, subtree, item,
                                                            tmp_path):
  run = layout(tmp_path / "run", steps)
  pool = pool_manifest.load_pool(run, "all")
  assert pool.names == [f"step_{s}" for s in steps] and pool.steps == list(steps)
  assert all(e.subtree == subtree and os.path.basename(e.path) == item for e in pool.entries)
  meta = checkpoints.validate_pool(pool)
  restored = checkpoints.restore_pool(pool, meta.abstract)
  for s, got in zip(steps, restored):
    want = _params(s)
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["embed"], want["embed"])
    np.testing.assert_array_equal(got["layer_0"]["w"], want["layer_0"]["w"])


def test_recycle_jax_writer_and_step_metadata(tmp_path):
  mngr = training_run.open_run(tmp_path / "run")
  for s in (100, 200):
    training_run.save_step(mngr, s, _params(s), {"recycle_jax": {"note": s}},
                           opt_state={"mu": _params(s)})
  mngr.wait_until_finished()
  mngr.close()
  assert sorted(os.listdir(tmp_path / "run" / "200")) == ["_CHECKPOINT_METADATA", "items"] or \
      "items" in os.listdir(tmp_path / "run" / "200")
  pool = pool_manifest.load_pool(str(tmp_path / "run"), "last:2")
  assert [e.subtree for e in pool.entries] == [("params",), ("params",)]
  meta = checkpoints.read_metadata(pool.paths[1], "step_200", pool.entries[1].subtree)
  assert meta.custom == {"recycle_jax": {"note": 200}}  # the step's, beside its items
  assert set(meta.abstract) == {"embed", "layer_0"}


@pytest.mark.parametrize("text, want", [
    ("last:2", [30, 40]), ("last:9", [10, 20, 30, 40]), ("every:20", [20, 40]),
    ("40,10", [10, 40]), ("all", [10, 20, 30, 40])])
def test_selection(text, want):
  assert training_run.select([40, 10, 30, 20], training_run.parse_steps(text), "run") == want


@pytest.mark.parametrize("text", ["last:0", "last:x", "first:3", "every:", "1,,2", "1,1", "",
                                  "-5"])
def test_bad_selection_syntax(text):
  with pytest.raises(UserError, match="step selection"):
    training_run.parse_steps(text)


def test_params_subtree_reads_the_tree_not_names():
  leaf = np.zeros(1)
  assert training_run.params_subtree({"embed": leaf, "params": {"w": leaf}}) == ("params",)
  assert training_run.params_subtree({"params": {"params": {"w": leaf}}}) == \
      ("params", "params")
  assert training_run.params_subtree({"layer_0": {"w": leaf}}) == ()


def test_lawa_and_ema_against_numpy():
  rng = np.random.default_rng(0)
  thetas = rng.normal(size=(6, 5))  # 6 checkpoints in step order
  lawa = baselines.lawa_weights(6, 4)
  np.testing.assert_allclose(lawa @ thetas, thetas[-4:].mean(0), rtol=1e-6)
  for decay in (0.0, 0.3, 0.9, 1.0):
    ema = thetas[0].copy()
    for t in thetas[1:]:
      ema = decay * ema + (1 - decay) * t
    w = baselines.ema_weights(6, decay)
    assert abs(w.sum() - 1) < 1e-6 and (w >= 0).all()
    np.testing.assert_allclose(w @ thetas, ema, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(baselines.lawa_weights(3), np.full(3, 1 / 3, np.float32))
  with pytest.raises(UserError, match="lawa_k"):
    baselines.lawa_weights(3, 4)
  with pytest.raises(UserError, match="ema_decay"):
    baselines.ema_weights(3, 1.5)


def test_merge_of_the_last_steps_is_their_average(tmp_path):
  run = _maxtext_run(tmp_path / "run", (10, 20, 30))
  out = tmp_path / "merged"
  assert cli.main(["merge", f"--pool={run}", "--steps=last:2", f"--output={out}",
                   "--log_level=error"]) == 0
  merged, meta = checkpoints.restore_local(str(out))
  want = (_params(20)["embed"] + _params(30)["embed"]) / 2
  np.testing.assert_allclose(merged["embed"], want, rtol=1e-6)
  assert meta.custom["recycle_jax"]["merge"]["pool"] == ["step_20", "step_30"]


def _rejected(capsys, args, *needles, untouched=()):
  """Exit 2, one `error:` line naming what, where and how to fix; nothing written."""
  before = {p: sorted(os.walk(p)) for p in untouched}
  assert cli.main([str(a) for a in args] + ["--log_level=error"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "; " in err[0], err
  for n in needles:
    assert n in err[0], err[0]
  assert {p: sorted(os.walk(p)) for p in untouched} == before
  return err[0]


@pytest.mark.parametrize("command", ["merge", pytest.param("search", marks=pytest.mark.slow)])
def test_bad_runs_are_refused(command, tmp_path, capsys):
  run = _maxtext_run(tmp_path / "run", (10, 20, 30))
  empty = tmp_path / "empty"
  os.makedirs(empty / "not_a_step")
  out = tmp_path / "out"

  def args(pool, steps):
    flags = [f"--pool={pool}", f"--output={out}"] if command == "merge" else \
        [f"--workdir={out}", f"--gin_bindings=Experiment.pool={str(pool)!r}",
         "--gin_bindings=Experiment.tasks=['rj_code']"]
    return [command, *flags] + ([f"--steps={steps}"] if steps else [])

  _rejected(capsys, args(empty, "last:8"), "no checkpoint steps", str(empty))
  _rejected(capsys, args(run, "last:1"), "selects 1 checkpoint (step 30)", "--steps",
            "2 or more", untouched=[run])
  _rejected(capsys, args(run, "every:7"), "selects 0 checkpoints", untouched=[run])
  _rejected(capsys, args(run, "10,15"), "step 15 is not in the run")
  _rejected(capsys, args(run, None), "needs a step selection", "--steps")
  if command == "search":  # a MaxText run records no model: merged, never scored
    _rejected(capsys, args(run, "last:2"), "no model family", "run/20/items")
  assert not out.exists()


def test_steps_with_different_trees_name_the_step_and_the_leaf(tmp_path, capsys):
  def tree(s):
    p = _params(s)
    if s == 30:  # a later step of another architecture: one more layer
      p["layer_1"] = {"w": np.ones((4, 4), np.float32)}
    return p
  run = _maxtext_run(tmp_path / "run", (10, 20, 30), tree)
  line = _rejected(capsys, ["merge", f"--pool={run}", "--steps=all",
                            f"--output={tmp_path / 'out'}"], "'step_30'", "layer_1/w",
                   untouched=[run])
  assert "step_10" in line
  assert not (tmp_path / "out").exists()


def test_inspect_a_run(tmp_path, capsys):
  run = _maxtext_run(tmp_path / "run", (10, 20, 30, 40))
  assert cli.main(["inspect", run, "--steps=every:20", "--log_level=error"]) == 0
  out = capsys.readouterr().out
  assert "(2 checkpoints)" in out and "step_40" in out and "step_10" not in out
  _rejected(capsys, ["inspect", run], "needs a step selection")


def test_steps_flag_needs_a_run_directory(tmp_path, capsys):
  run = _default_run(tmp_path / "run", (1, 2))
  manifest = tmp_path / "pool.json"
  manifest.write_text(json.dumps({"checkpoints": [
      {"name": "a", "path": os.path.join(run, "1", "default")},
      {"name": "b", "path": os.path.join(run, "2", "default")}]}))
  _rejected(capsys, ["merge", f"--pool={manifest}", "--steps=all",
                     f"--output={tmp_path / 'out'}"], "--steps selects the steps")


def test_parameters_that_are_not_the_recorded_model_are_refused(tmp_path, capsys):
  from recycle_jax.models import transformer
  model = transformer.ModelConfig(d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                                  d_ff=16).to_dict()
  mngr = training_run.open_run(tmp_path / "run")
  for s in (1, 2):
    training_run.save_step(mngr, s, _params(s), {"recycle_jax": {"model": model}})
  mngr.wait_until_finished()
  mngr.close()
  _rejected(capsys, ["merge", f"--pool={tmp_path / 'run'}", "--steps=all",
                     f"--output={tmp_path / 'out'}"], "step 1 of", "byte model")


@pytest.mark.slow
def test_search_over_a_run_reports_lawa_and_ema(micro_pool, tmp_path):
  """A search whose pool is a run's steps (the micro pool's members written as steps 100,
  200, 300 with their model): LAWA and EMA are rows of results.json with their weights."""
  from conftest import search_args
  members = pool_manifest.load_pool(micro_pool)
  mngr = training_run.open_run(tmp_path / "run")
  for s, path in zip((100, 200, 300), members.paths):
    params, meta = checkpoints.restore_local(path)
    training_run.save_step(mngr, s, params, meta.custom, opt_state={"mu": params})
  mngr.wait_until_finished()
  mngr.close()
  out = tmp_path / "search"
  assert cli.main(search_args(str(tmp_path / "run"), out, "--steps=last:2") +
                  ["--gin_bindings=training_run_weights.lawa_k=3"]) == 2  # K beyond the pool
  assert not out.exists()
  assert cli.main(search_args(str(tmp_path / "run"), out, "--steps=all", budget=8) +
                  ["--gin_bindings=training_run_weights.lawa_k=2",
                   "--gin_bindings=training_run_weights.ema_decay=0.25",
                   "--gin_bindings=Experiment.greedy_soup=False"]) == 0
  results = json.load(open(out / "results.json"))
  assert [p["name"] for p in results["pool"]] == ["step_100", "step_200", "step_300"]
  m = results["methods"]
  np.testing.assert_allclose(m["lawa"]["weights"], [0, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(m["ema"]["weights"], baselines.ema_weights(3, 0.25), atol=1e-6)
  assert "lawa" in (out / "report.md").read_text()


def test_streaming_merge_of_a_run_is_refused(tmp_path, capsys):
  run = _maxtext_run(tmp_path / "run", (10, 20))
  _rejected(capsys, ["merge", f"--pool={run}", "--steps=all", "--streaming",
                     f"--output={tmp_path / 'out'}"], "--streaming", "train states",
            untouched=[run])
  assert not (tmp_path / "out").exists()
