"""Every registered model family against transformers, from its registry entry alone.

For each family: its tiny config built by transformers (random float32 weights, torch CPU),
saved with save_pretrained, converted by `recycle-jax convert`; logits (plain and packed)
within 1e-4 of transformers', KV-cache greedy tokens equal to `generate`'s, and the
checkpoint and a merge of two exported back load in transformers with no missing or
unexpected tensors and the same logits. Sequences are longer than the sliding windows.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import torch  # noqa: E402 (pinned test dependency)
import transformers  # noqa: E402 (pinned test dependency)

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax import cli
from recycle_jax.models import families, transformer  # noqa: E402

TOL = 1e-4
NAMES = list(families.REGISTRY)


def rng(fam: families.Family) -> np.random.Generator:
  """Inputs fixed per family, whichever tests run."""
  return np.random.default_rng(NAMES.index(fam.name))


def hf_config(fam: families.Family) -> dict:
  extra = {families.FAMILY_KEY: fam.name} if fam.name != fam.model_type else {}
  return {**fam.tiny, **extra, "model_type": fam.model_type}


def build_hf(fam: families.Family, path, seed: int):
  """The family's tiny model with random weights (norms and biases too), saved at `path`."""
  torch.manual_seed(seed)
  cfg = dict(hf_config(fam))
  cfg.pop("model_type")
  config = transformers.AutoConfig.for_model(fam.model_type, initializer_range=0.2, **cfg)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # 1-D parameters are norm scales and biases: make them matter
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn_like(p))
    # Smaller embeddings, so a tied head does not just repeat the input token.
    model.get_input_embeddings().weight.mul_(0.25)
  model.generation_config.eos_token_id = None  # always 16 new tokens
  model.save_pretrained(path)
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def restore(path):
  meta = checkpoints.read_metadata(str(path))
  return (families.stored_config(meta.model_config, str(path)),
          checkpoints.restore(str(path), meta.abstract))


@pytest.fixture(scope="module", params=NAMES)
def family(request, tmp_path_factory):
  """(family, transformers model, its converted checkpoint, workdir)."""
  fam = families.REGISTRY[request.param]
  tmp = tmp_path_factory.mktemp(fam.name)
  model = build_hf(fam, tmp / "hf0", seed=0)
  assert cli.main(["convert", str(tmp / "hf0"), str(tmp / "pool" / "m0")]) == 0
  return fam, model, tmp / "pool" / "m0", tmp


def test_config_round_trips_and_every_parameter_is_mapped_once(family):
  fam, model, ckpt, _ = family
  cfg, params = restore(ckpt)
  assert cfg.family == fam.name
  assert families.from_hf_config(families.to_hf_config(cfg), "x")[1] == cfg
  paths = [t.path for t in families.tensor_map(cfg)]
  leaves = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(paths) == sorted(leaves) and len(set(paths)) == len(paths)
  assert len(paths) == len(model.state_dict()) - (
      cfg.tie_embeddings and "lm_head.weight" in model.state_dict())


def test_logits_match_transformers(family, record_property):
  fam, model, ckpt, _ = family
  cfg, params = restore(ckpt)
  tokens = rng(fam).integers(0, cfg.vocab_size, (2, 14))
  assert cfg.sliding_window is None or cfg.sliding_window < tokens.shape[1]
  err = np.abs(np.asarray(transformer.Decoder(cfg).apply(params, tokens))
               - hf_logits(model, tokens)).max()
  record_property("max_abs_logit_diff", float(err))
  print(f"\n{fam.name}: max |logit diff| {err:.2e}")
  assert err < TOL, err
  if cfg.sliding_window:  # the window really masks something at this length
    unwindowed = dataclasses.replace(cfg, sliding_window=None, layer_types=())
    changed = np.abs(np.asarray(transformer.Decoder(unwindowed).apply(params, tokens))
                     - hf_logits(model, tokens)).max()
    assert changed > 100 * TOL, changed


def test_packed_rows_match_transformers(family):
  """A shared prefix (segment 0) and two continuations in one row, as packed scoring has."""
  fam, model, ckpt, _ = family
  cfg, params = restore(ckpt)
  draw = rng(fam)
  prefix, c1, c2 = (draw.integers(0, cfg.vocab_size, n) for n in (6, 5, 4))
  row = np.concatenate([prefix, c1, c2])[None]
  positions = np.concatenate([np.arange(6), 6 + np.arange(5), 6 + np.arange(4)])[None]
  segments = np.array([0] * 6 + [1] * 5 + [2] * 4)[None]
  gather = np.arange(6, 15)[None]
  ours = np.asarray(transformer.Decoder(cfg).apply_packed(params, row, positions, segments, gather))
  ref1 = hf_logits(model, np.concatenate([prefix, c1])[None])[0, 6:]
  ref2 = hf_logits(model, np.concatenate([prefix, c2])[None])[0, 6:]
  err = np.abs(ours[0] - np.concatenate([ref1, ref2])).max()
  assert err < TOL, err


def test_kv_cache_greedy_equals_generate(family):
  fam, model, ckpt, _ = family
  cfg, params = restore(ckpt)
  lens = [3, 7]
  prompts = np.zeros((2, 8), np.int32)
  want = []
  draw = rng(fam)
  for i, n in enumerate(lens):
    prompts[i, :n] = draw.integers(0, cfg.vocab_size, n)
    with torch.no_grad():
      out = model.generate(torch.tensor(prompts[i:i + 1, :n]), do_sample=False,
                           max_new_tokens=16)
    want.append(out[0, n:].numpy())
  got = np.asarray(jax.jit(transformer.Decoder(cfg).greedy_decode, static_argnums=3)(
      params, prompts, np.array(lens, np.int32), 16))
  np.testing.assert_array_equal(got, np.stack(want))
  assert len(np.unique(got)) > 5  # not a constant stream


def _load_strict(path):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def test_export_and_merge_load_in_transformers(family):
  fam, model, ckpt, tmp = family
  tokens = rng(fam).integers(0, fam.tiny["vocab_size"], (2, 14))
  assert cli.main(["convert", str(ckpt), str(tmp / "back")]) == 0
  exported = json.loads((tmp / "back" / "config.json").read_text())
  source = json.loads((tmp / "hf0" / "config.json").read_text())
  for key in ("model_type", "architectures", "head_dim", "max_position_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
              "rope_parameters", "sliding_window", "layer_types", "use_sliding_window",
              "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
              "hidden_act", "hidden_activation", families.FAMILY_KEY):
    if key in source:
      assert exported.get(key) == source[key], key
  err = np.abs(hf_logits(_load_strict(tmp / "back"), tokens) - hf_logits(model, tokens)).max()
  assert err < TOL, err

  build_hf(fam, tmp / "hf1", seed=1)
  assert cli.main(["convert", str(tmp / "hf1"), str(tmp / "pool" / "m1")]) == 0
  (tmp / "pool" / "pool.json").write_text(json.dumps({"checkpoints": [
      {"name": "m0", "path": "m0"}, {"name": "m1", "path": "m1"}]}))
  # The streaming merge (a twentieth of the in-memory one's CPU here, bit-identical to it;
  # test_convert exports an in-memory merge).
  assert cli.main(["merge", f"--pool={tmp / 'pool'}", "--weights=0.3,0.7", "--streaming",
                   f"--output={tmp / 'merged'}"]) == 0
  assert cli.main(["convert", str(tmp / "merged"), str(tmp / "hf_merged")]) == 0
  cfg, params = restore(tmp / "merged")
  assert cfg == restore(ckpt)[0]
  ours = np.asarray(transformer.Decoder(cfg).apply(params, tokens))
  err = np.abs(hf_logits(_load_strict(tmp / "hf_merged"), tokens) - ours).max()
  assert err < TOL, err
  p0, p1 = restore(ckpt)[1], restore(tmp / "pool" / "m1")[1]
  np.testing.assert_allclose(params["layer_0"]["attn"]["q"]["kernel"],
                             0.3 * p0["layer_0"]["attn"]["q"]["kernel"]
                             + 0.7 * p1["layer_0"]["attn"]["q"]["kernel"], atol=1e-6)


# config.json files as published on the Hugging Face Hub (older transformers wrote them:
# rope_theta and rope_scaling at the top, Gemma 3's rope_local_base_freq and
# sliding_window_pattern, Qwen's unused sliding_window).
HUB_CONFIGS = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "vocab_size": 128256},
    "mistral-7b-v0.1": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000},
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-0.6b": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "gemma-2-2b": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
        "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "vocab_size": 256000},
    "gemma-3-1b": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False, "attn_logit_softcapping": None, "bos_token_id": 2,
        "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "vocab_size": 262144},
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_read_as_transformers_reads_them(name):
  """Our reading of a published config.json equals our reading of the same config after
  transformers has normalized it (rope_parameters, layer_types, its defaults)."""
  hub = HUB_CONFIGS[name]
  fam, cfg = families.from_hf_config(hub, name)
  kw = {k: v for k, v in hub.items() if k != "model_type"}
  normalized = transformers.AutoConfig.for_model(hub["model_type"], **kw).to_dict()
  assert families.from_hf_config(normalized, name) == (fam, cfg)
  assert families.from_hf_config(families.to_hf_config(cfg, hub), name) == (fam, cfg)
  if name == "gemma-3-1b":  # local layers: own base, unscaled; global: scaled
    assert (cfg.local_rope_theta, cfg.rope_theta, cfg.rope_factor) == (1e4, 1e6, 8.0)
    assert cfg.layer_types.count(transformer.FULL) == 4 and cfg.layer_types[5] == transformer.FULL
  if name.startswith("qwen"):  # sliding_window is set but unused
    assert cfg.sliding_window is None
  if name == "mistral-7b-v0.1":
    assert cfg.sliding_window == 4096 and set(cfg.layer_types) == {transformer.SLIDING}


def test_configs_of_older_checkpoints_still_load(tmp_path, capsys):
  """Metadata written before families existed holds only the first ten fields."""
  old = {"vocab_size": 259, "d_model": 32, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2, "d_ff": 64, "tie_embeddings": True, "rope_theta": 10000.0,
         "norm_eps": 1e-5, "dtype": "float32"}
  cfg = families.stored_config(old, "old")
  assert (cfg.family, cfg.head_dim, cfg.layer_types) == ("byte", 8, (transformer.FULL,) * 2)
  params = transformer.init_params(cfg, jax.random.key(0))
  families.check_params(cfg, params, "old")
  checkpoints.save(str(tmp_path / "ckpt"), params, {"model": {**old, "family": "gpt9"}})
  capsys.readouterr()
  assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown model family 'gpt9' (") and "ckpt" in err
  assert not os.path.exists(tmp_path / "hf")
