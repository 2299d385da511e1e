"""Hugging Face Llama <-> Orbax checkpoints of `models.Transformer`.

The two layouts differ only in names and in kernel orientation: torch Linear stores
[out, in], flax Dense [in, out]. Tensors go through the `safetensors` numpy API, so no
torch is needed. Only configurations the model computes exactly are accepted: SiLU
gated MLP, no biases, default RoPE, head_dim == hidden_size / num_attention_heads.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Iterator

import jax
import numpy as np

from recycle_jax import checkpoints, models
from recycle_jax.errors import UserError, check

PyTree = Any
HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
FAMILY = ("llama", "mistral")  # same tensors and maths as the model (no biases)
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old exports carry; recomputed anyway


# ----------------------------------------------------------------------------- configs

def _rope_theta(hf: dict) -> float:
  # transformers >= 5 nests it in rope_parameters; older configs keep it at the top.
  rp = hf.get("rope_parameters") or {}
  return float(rp.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def model_config_from_hf(hf: dict, where: str) -> models.ModelConfig:
  """ModelConfig for a HF config.json dict; refuses what the model cannot reproduce."""
  def need(cond, what, fix="this model family is not supported by recycle_jax's model"):
    check(cond, what, where, fix)

  need(hf.get("model_type") in FAMILY, f"model_type {hf.get('model_type')!r} is not one of "
       f"{list(FAMILY)}")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    need(isinstance(hf.get(key), int), f"config.json lacks integer {key!r}",
         "export it with transformers' save_pretrained")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or h
  need(d % h == 0, f"hidden_size {d} is not divisible by num_attention_heads {h}")
  need(hf.get("head_dim") in (None, d // h),
       f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads = {d // h}")
  need(h % kv == 0, f"num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
  need(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} != 'silu'")
  need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "biases are not supported")
  rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get(
      "rope_type", (hf.get("rope_scaling") or {}).get("type", "default"))
  need(rope_type == "default", f"RoPE scaling {rope_type!r} is not supported")
  need(hf.get("sliding_window") is None, "sliding-window attention is not supported")
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  need(dtype in ("float32", "bfloat16", "float16"), f"dtype {dtype!r} is not supported")
  return models.ModelConfig(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
      num_heads=h, num_kv_heads=kv, d_ff=hf["intermediate_size"],
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), dtype=dtype)


def hf_config_from_model(cfg: models.ModelConfig, base: dict | None = None) -> dict:
  """config.json for `cfg`; `base` (the original HF config, if any) keeps token ids etc."""
  byte = cfg.vocab_size == models.VOCAB.vocab_size  # ids are only known for our vocabulary
  defaults = {"bos_token_id": None, "eos_token_id": models.EOS_ID if byte else None,
              "pad_token_id": models.PAD_ID if byte else None,
              "max_position_embeddings": 4096}
  keep = {k: v for k, v in (base or {}).items() if k in defaults}
  return {**defaults, **keep,
          "architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.dtype,
          "torch_dtype": cfg.dtype}


# ----------------------------------------------------------------------------- names

def name_map(cfg: models.ModelConfig) -> Iterator[tuple[str, tuple[str, ...], bool]]:
  """(HF tensor name, flax param path, transposed) for every parameter of `cfg`."""
  yield "model.embed_tokens.weight", ("embed", "embedding"), False
  for i in range(cfg.num_layers):
    hf, fx = f"model.layers.{i}.", f"layer_{i}"
    for p in "qkvo":
      yield f"{hf}self_attn.{p}_proj.weight", (fx, "attn", p, "kernel"), True
    for p in ("gate", "up", "down"):
      yield f"{hf}mlp.{p}_proj.weight", (fx, p, "kernel"), True
    yield f"{hf}input_layernorm.weight", (fx, "attn_norm", "scale"), False
    yield f"{hf}post_attention_layernorm.weight", (fx, "mlp_norm", "scale"), False
  yield "model.norm.weight", ("final_norm", "scale"), False
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), True


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------------------- HF -> params

def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, HF_CONFIG))


def _weight_files(src: str) -> list[str]:
  index = os.path.join(src, HF_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = [HF_WEIGHTS]
  paths = [os.path.join(src, f) for f in files]
  for p in paths:
    check(os.path.isfile(p), f"weights file {os.path.basename(p)} not found", src,
          "convert a directory written by save_pretrained with safe_serialization")
  return paths


def read_hf_tensors(src: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  for path in _weight_files(src):
    with safe_open(path, framework="np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def load_hf(src: str) -> tuple[models.ModelConfig, PyTree, dict]:
  """(config, flax params, original HF config) from a HF model directory."""
  path = os.path.join(src, HF_CONFIG)
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read config.json: {e}", src) from None
  cfg = model_config_from_hf(hf, path)
  tensors = read_hf_tensors(src)
  dtype = np.dtype(jax.numpy.dtype(cfg.dtype))
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))  # no FLOPs
  params: dict = {}
  used = set()
  for hf_name, fx_path, transpose in name_map(cfg):
    check(hf_name in tensors, f"tensor {hf_name!r} is missing", src,
          "the weights do not match config.json")
    x, want = tensors[hf_name], tuple(_get(shapes, fx_path).shape)
    want = want[::-1] if transpose else want
    check(x.shape == want, f"tensor {hf_name!r} has shape {x.shape}, config.json implies "
          f"{want}", src, "the weights do not match config.json")
    _set(params, fx_path, np.ascontiguousarray((x.T if transpose else x).astype(dtype)))
    used.add(hf_name)
  extra = sorted(k for k in tensors if k not in used and not k.endswith(IGNORED)
                 and not (cfg.tie_embeddings and k == "lm_head.weight"))
  check(not extra, f"unexpected tensors {extra[:3]}{'...' if len(extra) > 3 else ''}", src,
        "this architecture has parameters recycle_jax's model lacks")
  return cfg, params, hf


# ----------------------------------------------------------------------------- params -> HF

def save_hf(dst: str, cfg: models.ModelConfig, params: PyTree, base: dict | None = None
            ) -> None:
  from safetensors.numpy import save_file
  os.makedirs(dst, exist_ok=True)
  tensors = {}
  for hf_name, fx_path, transpose in name_map(cfg):
    x = np.asarray(jax.device_get(_get(params, fx_path)))
    tensors[hf_name] = np.ascontiguousarray(x.T if transpose else x)
  # transformers refuses safetensors files without format metadata.
  save_file(tensors, os.path.join(dst, HF_WEIGHTS), metadata={"format": "pt"})
  checkpoints.atomic_write_text(os.path.join(dst, HF_CONFIG),
                                json.dumps(hf_config_from_model(cfg, base), indent=1))


# ----------------------------------------------------------------------------- entry point

def convert(src: str, dst: str, overwrite: bool = False) -> str:
  """HF dir -> Orbax checkpoint, or Orbax checkpoint -> HF dir; returns the direction."""
  check(os.path.isdir(src), "source directory not found", src,
        "pass a Hugging Face model directory or an Orbax checkpoint")
  checkpoints.check_output(dst, [src], overwrite, flag="DST")
  if is_hf_dir(src):
    cfg, params, hf = load_hf(src)
    checkpoints.save(dst, params, {"model": cfg.to_dict(),
                                   "source": {"format": "huggingface",
                                              "path": os.path.abspath(src)},
                                   "hf_config": hf}, overwrite=overwrite)
    return "huggingface -> orbax"
  meta = checkpoints.read_metadata(src)
  check(meta.model_config is not None, "checkpoint has no recycle_jax model config", src,
        "only checkpoints written by recycle_jax can be exported")
  cfg = models.ModelConfig(**meta.model_config)
  params = checkpoints.restore(src, meta.abstract)
  tmp = f"{os.path.abspath(dst)}.partial-{uuid.uuid4().hex[:8]}"  # renamed when complete
  save_hf(tmp, cfg, params, meta.custom.get(checkpoints.META_KEY, {}).get("hf_config"))
  if os.path.exists(dst):
    shutil.rmtree(dst)
  os.rename(tmp, dst)
  return "orbax -> huggingface"
