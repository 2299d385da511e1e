"""mergekit configs: parameter resolution as mergekit's, refusals by name, and whole merges
of small safetensors folders written to disk (sharded, with the donor's files)."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from recycle_jax import cli
from recycle_jax.merging import hf_merge
from recycle_jax.checkpoint_io import mergekit_config, safetensors_io
from recycle_jax.runtime.errors import UserError

LAYERS = 3


def _tensors(rng, dtype):
  t = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
       "lm_head.weight": (16, 8)}
  for i in range(LAYERS):
    t[f"model.layers.{i}.self_attn.q_proj.weight"] = (8, 8)
    t[f"model.layers.{i}.mlp.up_proj.weight"] = (12, 8)
  return {k: rng.normal(size=s).astype(dtype) for k, s in t.items()}


def write_folder(path, tensors, tokenizer="tok-a", max_shard_bytes=1 << 30):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "num_hidden_layers": LAYERS, "torch_dtype": "float32"},
              f)
  if tokenizer:
    for n in ("tokenizer.json", "tokenizer_config.json"):
      with open(os.path.join(path, n), "w") as f:  # JSON, as transformers writes them
        json.dump({"name": tokenizer}, f)
  w = safetensors_io.Writer(path, [(k, v.dtype, v.shape) for k, v in tensors.items()],
                            max_shard_bytes)
  for k, v in tensors.items():
    w.write(k, v)
  w.close(fsync=False)
  return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  rng = np.random.default_rng(0)
  base = _tensors(rng, np.float32)
  out = {"base": write_folder(str(d / "base"), base)}
  for i in range(3):
    t = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    out[f"m{i}"] = write_folder(str(d / f"m{i}"), t, max_shard_bytes=1000)  # sharded
  out["other_tok"] = write_folder(str(d / "other_tok"), base, tokenizer="tok-b")
  out["no_tok"] = write_folder(str(d / "no_tok"), base, tokenizer=None)
  return out


def config(tmp_path, cfg, name="merge.yml"):
  p = tmp_path / name
  p.write_text(yaml.safe_dump(cfg))
  return str(p)


def read(folder):
  return {k: v for f in os.listdir(folder) if f.endswith(".safetensors")
          for k, v in load_file(os.path.join(folder, f)).items()}


def test_parameters_resolve_as_mergekit(folders, tmp_path):
  """Per-model before slice before global; filters by substring; numeric gradients
  interpolated over layers (t = i / (L - 1)), t = 0 outside the layers."""
  plan = mergekit_config.load(config(tmp_path, {
      "merge_method": "ties", "base_model": folders["base"],
      "models": [{"model": folders["m0"], "parameters": {
          "weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}],
          "density": [0.2, 0.6, 0.4]}},
                 {"model": folders["m1"]}],
      "parameters": {"weight": 0.5, "density": 0.9, "normalize": [True, False],
                     "lambda": "1e-1"}}))
  assert plan.inputs == (folders["m0"], folders["m1"], folders["base"])  # base appended
  assert plan.non_base == (folders["m0"], folders["m1"])
  shared, per = plan.resolve("model.layers.1.mlp.up_proj.weight")  # t = 0.5
  m0, m1 = per[folders["m0"]], per[folders["m1"]]
  assert m0 == {"weight": 0.5, "density": pytest.approx(0.6)}
  assert m1 == {"weight": 0.5, "density": 0.9}
  assert per[folders["base"]] == {}  # no NON_BASE parameter for the base
  assert shared["lambda"] == pytest.approx(0.1)  # a numeric string, as pydantic reads it
  assert shared["normalize"] is True  # booleans pick values[int(t * (len - 1))]
  shared, per = plan.resolve("model.layers.2.self_attn.q_proj.weight")  # t = 1
  assert per[folders["m0"]] == {"weight": 0.25, "density": pytest.approx(0.4)}
  assert shared["normalize"] is False and shared["rescale"] is False  # method default
  _, per = plan.resolve("model.embed_tokens.weight")  # t = 0
  assert per[folders["m0"]]["density"] == pytest.approx(0.2)


def test_slices_give_per_range_parameters(folders, tmp_path):
  src = lambda r, w: [{"model": folders[m], "layer_range": r, "parameters": {"weight": w}}
                      for m in ("m0", "m1")]
  plan = mergekit_config.load(config(tmp_path, {
      "merge_method": "linear", "slices": [{"sources": src([0, 1], 0.3)},
                                           {"sources": src([1, 3], [0.0, 1.0])}]}))
  assert plan.resolve("model.layers.0.mlp.up_proj.weight")[1][folders["m0"]]["weight"] == 0.3
  assert plan.resolve("model.layers.2.mlp.up_proj.weight")[1][folders["m0"]]["weight"] == 1.0
  assert plan.resolve("lm_head.weight")[1][folders["m0"]]["weight"] == 0.0  # last slice, t=0


BAD = {  # what is wrong -> (config edits, the words the error must contain)
    "unknown method": ({"merge_method": "frobnicate"}, "unknown merge method 'frobnicate'"),
    "unsupported method": ({"merge_method": "ram"}, "not supported"),
    "missing model": ({"models": [{"model": "/nonexistent/m"}]}, "not found on disk"),
    "hub id": ({"models": [{"model": "org/some-model"}]}, "not found on disk"),
    "parameter not taken": ({"models": [{"model": "M0", "parameters": {"weight": 1,
                                                                       "gamma": 0.1}}]},
                            "takes no parameter 'gamma'"),
    "shared parameter per model": ({"models": [{"model": "M0", "parameters": {
        "weight": 1, "lambda": 2}}]}, "applies to the whole merge"),
    "absent tokenizer source": ({"tokenizer_source": "NO_TOK"}, "has no tokenizer files"),
    "tokenizer union": ({"tokenizer_source": "union"}, "union"),
    "unsupported field": ({"modules": {}}, "'modules'"),
    "unknown field": ({"merge_metod": "ties"}, "unsupported field 'merge_metod'"),
    "wrong type": ({"parameters": {"lambda": "much"}}, "must be a number"),
    "base missing": ({"base_model": None}, "needs a base_model"),
    "stacked layers": ({"models": None, "slices": [{"sources": [
        {"model": "M0", "layer_range": [0, 2]}]}, {"sources": [
            {"model": "M0", "layer_range": [1, 3]}]}]}, "do not continue from layer 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_are_refused_by_name_and_nothing_is_written(folders, tmp_path, case,
                                                                capsys):
  edits, words = BAD[case]
  cfg = {"merge_method": "ties", "base_model": folders["base"],
         "models": [{"model": folders["m0"], "parameters": {"weight": 1.0}}]}
  cfg = {k: v for k, v in {**cfg, **edits}.items() if v is not None}
  text = yaml.safe_dump(cfg).replace("M0", folders["m0"]).replace("NO_TOK", folders["no_tok"])
  path = tmp_path / "bad.yml"
  path.write_text(text)
  out = tmp_path / "out"
  assert cli.main(["merge", f"--config={path}", f"--output={out}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
  assert not os.path.exists(out) and os.listdir(tmp_path) == ["bad.yml"]


def test_a_missing_required_parameter_and_differing_tokenizers_are_refused(folders, tmp_path):
  with pytest.raises(UserError, match="parameter 'weight' is required"):
    hf_merge.plan_tensors(mergekit_config.load(config(tmp_path, {
        "merge_method": "linear", "models": [{"model": folders["m0"]}]})))
  plan = mergekit_config.load(config(tmp_path, {
      "merge_method": "linear", "parameters": {"weight": 1.0},
      "models": [{"model": folders["m0"]}, {"model": folders["other_tok"]}]}))
  with pytest.raises(UserError, match=f"model {folders['other_tok']}'s tokenizer differs "
                     f"from {folders['m0']}'s"):
    hf_merge.merge(plan, str(tmp_path / "out"))
  plan = mergekit_config.load(config(tmp_path, {  # one without: its vocabulary is unknown
      "merge_method": "linear", "parameters": {"weight": 1.0},
      "models": [{"model": folders["m0"]}, {"model": folders["no_tok"]}]}))
  with pytest.raises(UserError, match=f"model {folders['no_tok']} has no tokenizer"):
    hf_merge.merge(plan, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_linear_merge_with_gradients_and_out_dtype(folders, tmp_path):
  cfg = config(tmp_path, {
      "merge_method": "linear", "out_dtype": "bfloat16", "tokenizer_source": folders["m1"],
      "models": [{"model": folders["m0"], "parameters": {"weight": [1.0, 3.0]}},
                 {"model": folders["m1"], "parameters": {"weight": 1.0}}]})
  out = str(tmp_path / "merged")
  assert cli.main(["merge", f"--config={cfg}", f"--output={out}", "--no_fsync"]) == 0
  got, a, b = read(out), read(folders["m0"]), read(folders["m1"])
  assert set(got) == set(a)
  for k, v in got.items():
    layer = int(k.split(".")[2]) if ".layers." in k else None
    w0 = 1.0 + 2.0 * (layer / (LAYERS - 1) if layer is not None else 0.0)
    want = (w0 * a[k] + b[k]) / (w0 + 1.0)
    assert v.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(v.astype(np.float32), want, rtol=2**-8, atol=1e-6)
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  assert json.load(open(os.path.join(out, "tokenizer.json"))) == {"name": "tok-a"}
  assert os.path.isfile(os.path.join(out, "mergekit_config.yml"))


def test_ties_merge_of_sharded_folders_equals_the_kernel(folders, tmp_path):
  from recycle_jax.merging import task_vectors
  import jax.numpy as jnp
  cfg = config(tmp_path, {
      "merge_method": "ties", "base_model": folders["base"], "dtype": "float32",
      "models": [{"model": folders[m], "parameters": {"weight": w, "density": 0.5}}
                 for m, w in (("m0", 0.7), ("m1", -0.2), ("m2", 0.5))],
      "parameters": {"lambda": 0.8}})
  out = str(tmp_path / "merged")
  hf_merge.merge(mergekit_config.load(cfg), out, max_shard_bytes=2000, fsync=False)
  assert os.path.isfile(os.path.join(out, safetensors_io.INDEX))
  got, base = read(out), read(folders["base"])
  xs = [read(folders[m]) for m in ("m0", "m1", "m2")]
  for k, v in got.items():
    counts = jnp.asarray([[int(0.5 * v.size), 0]] * 3, jnp.int32)
    want = task_vectors.combine(base[k], [x[k] for x in xs], jnp.asarray([0.7, -0.2, 0.5]),
                                0.8, sparsify="magnitude", density=0.5, consensus=True,
                                normalize=True, mergekit_rules=True, counts=counts)
    np.testing.assert_allclose(v, np.asarray(want), rtol=1e-6, atol=1e-6)


def test_merge_needs_a_pool_or_a_config_not_both(folders, tmp_path, capsys):
  out = tmp_path / "out"
  assert cli.main(["merge", f"--output={out}"]) == 2
  assert "no pool given" in capsys.readouterr().err
  cfg = config(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0},
                          "models": [{"model": folders["m0"]}]})
  assert cli.main(["merge", f"--config={cfg}", "--pool=p.json", f"--output={out}"]) == 2
  assert "--config names the models itself" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_a_search_pool_from_a_config_is_its_models_besides_the_base(folders, tmp_path):
  from recycle_jax.checkpoint_io import pool_manifest
  cfg = config(tmp_path, {"merge_method": "ties", "base_model": folders["base"],
                          "models": [{"model": folders[m], "parameters": {"weight": 1.0}}
                                     for m in ("m0", "base", "m2")]})
  pool = pool_manifest.load_pool(cfg)
  assert pool.names == ["m0", "m2"] and pool.paths == [folders["m0"], folders["m2"]]
  assert mergekit_config.pool_and_base(cfg)[1] == folders["base"]
