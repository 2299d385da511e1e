"""Hugging Face Llama <-> Orbax conversion, checked against transformers' own forward pass."""
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

import torch  # noqa: E402 (pinned test dependency)
import transformers  # noqa: E402 (pinned test dependency)

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import hf_reader
from recycle_jax import convert
from recycle_jax import cli
from recycle_jax.models import transformer  # noqa: E402
from recycle_jax.runtime.errors import UserError  # noqa: E402
import hf_fixtures
import tree_helpers

VOCAB = 300  # deliberately not the byte vocabulary (259)
TOL = 1e-4


def tiny_hf(path, seed=0, tie=True, kv_heads=2, **overrides):
  """A random float32 LlamaForCausalLM saved with save_pretrained; returns the model."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
      rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2, **overrides)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.mul_(1 + 0.3 * torch.rand_like(p))
  model.save_pretrained(path)
  return model


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(path) -> np.ndarray:
  meta = checkpoints.read_metadata(str(path))
  cfg = transformer.ModelConfig(**meta.model_config)
  params = checkpoints.restore(str(path), meta.abstract)
  return np.asarray(tree_helpers.make_apply(cfg)(params, TOKENS))


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 1), (False, 4)],
                         ids=["tied-gqa", "untied-mqa", "untied-mha"])
def test_hf_to_orbax_matches_transformers(tmp_path, tie, kv_heads):
  model = tiny_hf(tmp_path / "hf", tie=tie, kv_heads=kv_heads)
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
  meta = checkpoints.read_metadata(str(tmp_path / "ckpt"))
  cfg = meta.model_config
  assert (cfg["vocab_size"], cfg["num_kv_heads"], cfg["tie_embeddings"]) == (VOCAB, kv_heads, tie)
  assert cfg["rope_theta"] == 500.0 and cfg["norm_eps"] == 1e-5 and cfg["d_ff"] == 48
  assert ("lm_head" in meta.abstract) == (not tie)
  err = np.abs(our_logits(tmp_path / "ckpt") - hf_logits(model)).max()
  assert err < TOL, err


def test_sharded_index_is_read(tmp_path):
  model = tiny_hf(tmp_path / "one", tie=False)
  tensors = hf_fixtures.read_hf_tensors(str(tmp_path / "one"))
  from safetensors.numpy import save_file
  os.makedirs(tmp_path / "sharded")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / "sharded" / fname),
              metadata={"format": "pt"})
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "sharded" / hf_reader.HF_INDEX).write_text(json.dumps(index))
  (tmp_path / "sharded" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
  convert.convert(str(tmp_path / "sharded"), str(tmp_path / "ckpt"))
  assert np.abs(our_logits(tmp_path / "ckpt") - hf_logits(model)).max() < TOL


def test_merged_checkpoint_exports_to_transformers(tmp_path):
  """Two converted models merged by `recycle-jax merge`, exported, loaded by transformers."""
  entries = []
  for i in range(2):
    tiny_hf(tmp_path / f"hf{i}", seed=i, tie=False)
    convert.convert(str(tmp_path / f"hf{i}"), str(tmp_path / "pool" / f"m{i}"))
    entries.append({"name": f"m{i}", "path": f"m{i}"})
  (tmp_path / "pool" / "pool.json").write_text(json.dumps({"checkpoints": entries}))
  assert cli.main(["merge", f"--pool={tmp_path / 'pool'}", "--weights=0.3,0.7",
                   f"--output={tmp_path / 'merged'}"]) == 0
  assert cli.main(["convert", str(tmp_path / "merged"), str(tmp_path / "hf_merged")]) == 0
  assert sorted(os.listdir(tmp_path / "hf_merged")) == [
      "config.json", "generation_config.json", "model.safetensors"]
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_merged")).eval()
  ours = our_logits(tmp_path / "merged")
  err = np.abs(hf_logits(loaded) - ours).max()
  assert err < TOL, err
  # And the merge really is 0.3 * m0 + 0.7 * m1, in transformers' naming.
  t = {k: hf_fixtures.read_hf_tensors(str(tmp_path / d)) for k, d in
       (("a", "hf0"), ("b", "hf1"), ("m", "hf_merged"))}
  name = "model.layers.1.self_attn.k_proj.weight"
  np.testing.assert_allclose(t["m"][name], 0.3 * t["a"][name] + 0.7 * t["b"][name], atol=1e-6)


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
  tiny_hf(tmp_path / "hf32", tie=False)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf32"))
  model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  meta = checkpoints.read_metadata(str(tmp_path / "ckpt"))
  assert meta.model_config["dtype"] == "bfloat16"
  assert {x.dtype.name for x in jax.tree.leaves(meta.abstract)} == {"bfloat16"}
  convert.convert(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  a, b = (hf_fixtures.read_hf_tensors(str(tmp_path / d)) for d in ("hf", "back"))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16))


def test_round_trip_keeps_hf_token_ids_and_tied_export_loads(tmp_path):
  model = tiny_hf(tmp_path / "hf", tie=True, bos_token_id=5, eos_token_id=6)
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  convert.convert(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  cfg = json.loads((tmp_path / "back" / "config.json").read_text())
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (5, 6, True)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert np.abs(hf_logits(back) - hf_logits(model)).max() < TOL


@pytest.mark.parametrize("change,message", [
    ({"head_dim": 7}, "head_dim 7 is not an even integer"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     "RoPE scaling 'yarn'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "biases are not supported"),
])
def test_unsupported_configs_are_refused_clearly(tmp_path, capsys, change, message):
  tiny_hf(tmp_path / "hf")
  cfg_path = tmp_path / "hf" / "config.json"
  cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
  capsys.readouterr()  # drop save_pretrained's progress bar
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "out")


def test_missing_tensor_and_existing_output_are_refused(tmp_path):
  tiny_hf(tmp_path / "hf")
  with pytest.raises(UserError, match="overlaps input"):
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "hf" / "sub"))
  os.makedirs(tmp_path / "taken")
  with pytest.raises(UserError, match="already exists"):
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "taken"))
  tensors = hf_fixtures.read_hf_tensors(str(tmp_path / "hf"))
  del tensors["model.norm.weight"]
  from safetensors.numpy import save_file
  save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError, match="'model.norm.weight' is missing"):
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "out"))


@pytest.mark.parametrize("with_config", [True, False])
def test_pool_with_different_vocabularies_is_reported(tmp_path, with_config):
  """By the named config field when both record one, else by the first tensor shape."""
  tiny_hf(tmp_path / "hf")
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "a"))
  cfg_a = transformer.ModelConfig(**checkpoints.read_metadata(str(tmp_path / "a")).model_config)
  cfg_b = dataclasses.replace(cfg_a, vocab_size=259)
  checkpoints.save(str(tmp_path / "b"), transformer.init_params(cfg_b, jax.random.key(0)),
                   {"model": cfg_b.to_dict()} if with_config else {})
  pool = pool_manifest.make_pool([pool_manifest.Entry("a", str(tmp_path / "a")),
                                pool_manifest.Entry("b", str(tmp_path / "b"))])
  expected = ("model config differs from 'a': vocab_size 259 vs 300" if with_config else
              "parameter 'embed/embedding' has shape (259, 32) but 'a' has (300, 32)")
  with pytest.raises(UserError, match=re.escape(expected)) as e:
    checkpoints.validate_pool(pool)
  assert "checkpoint 'b'" in str(e.value)


def _digest(folder) -> dict:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _break_pickled(hf):
  """Only pickled weights, which would leave a marker file if they were ever unpickled."""
  import pickle

  class Bomb:
    def __reduce__(self):
      return (open, (str(hf.parent / "UNPICKLED"), "w"))
  os.remove(hf / "model.safetensors")
  (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
  (hf / "model.pt").write_bytes(pickle.dumps(Bomb()))


def _break_index(hf):
  (hf / hf_reader.HF_INDEX).write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "pytorch_model-00001-of-00001.bin"}}))


def _break_family(hf):
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))


def _break_shapes(hf):
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))


def _break_extra(hf):
  from safetensors.numpy import save_file
  tensors = hf_fixtures.read_hf_tensors(str(hf))
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})


def _break_truncated(hf):
  data = (hf / "model.safetensors").read_bytes()
  (hf / "model.safetensors").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage,message", [
    (_break_pickled, "weights are pickled (model.pt, pytorch_model.bin)"),
    (_break_index, "weights file 'pytorch_model-00001-of-00001.bin' is not a safetensors"),
    (_break_family, "model_type 'gpt_neox' is not a supported family (config.json at "),
    (_break_shapes, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (48, 32), "
                    "config.json implies (64, 32)"),
    (_break_extra, "unexpected tensors ['model.layers.0.self_attn.o_proj.bias']"),
    (_break_truncated, "cannot read safetensors header"),
], ids=["pickled", "pickled-index", "family", "shapes", "extra-tensor", "truncated"])
def test_bad_hf_folders_are_refused_and_nothing_is_written(tmp_path, capsys, damage, message):
  tiny_hf(tmp_path / "hf")
  damage(tmp_path / "hf")
  before = _digest(tmp_path / "hf")
  capsys.readouterr()
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err, err
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no partial, no marker
  assert _digest(tmp_path / "hf") == before


def test_config_json_keeps_family_fields_on_export(tmp_path):
  """A Mistral config's window, RoPE and token ids survive HF -> Orbax -> HF verbatim."""
  torch.manual_seed(0)
  cfg = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=7,
      max_position_embeddings=321, bos_token_id=3, eos_token_id=4, pad_token_id=5,
      rope_parameters={"rope_type": "llama3", "rope_theta": 300.0, "factor": 4.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                       "original_max_position_embeddings": 64})
  transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
  convert.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  convert.convert(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "back"))
  for key in ("model_type", "architectures", "sliding_window", "head_dim", "rope_parameters",
              "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings", "rms_norm_eps", "num_key_value_heads"):
    assert a[key] == b[key], key
