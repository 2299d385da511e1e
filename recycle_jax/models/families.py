"""Model families: how each Hugging Face architecture maps onto `transformer.Transformer`.

A family is one `Family` record in `REGISTRY` (MaxText's checkpoint_conversion pattern):
its config mapping from and to Hugging Face config.json (`read`, `write`, `defaults`), its
parameter names (`norms`; the rest is shared), and its forward-pass differences, which are
`transformer.ModelConfig` flags that `read` sets (one model implementation serves every family).
`tiny` is a small config of the family; the tests build it with transformers, so a family
added here is tested for parity without a new test.

The interface other modules use (all pure, no file access):

  from_hf_config(hf: dict, where: str) -> (Family, ModelConfig)
      The family and config for a config.json dict. Anything the family does not
      implement (an unknown model_type or rope type, a field value it cannot reproduce) is
      a UserError naming the field; pass `where="config.json at DIR"`.
  tensor_map(cfg: ModelConfig) -> list[TensorMap]
      One (hf_name, path, transpose) per parameter of `cfg`, in a fixed order. `path` is
      the key path in the flax params tree; `transpose` means param = hf.T (2-D kernels:
      torch Linear is [out, in], flax Dense [in, out]), so a param slice [a:b, c:d] is
      hf[c:d, a:b].T. `TensorMap.to_param` / `to_hf` / `hf_shape` apply it. No reshapes.
  check_tensors(cfg, shapes: {hf_name: shape}, where) -> None
      Refuses missing, unexpected or wrongly shaped tensors, from safetensors headers alone.
  to_hf_config(cfg: ModelConfig, base: dict | None = None) -> dict
      config.json for `cfg`; `base` (the source config.json) keeps its token ids.
  param_shapes(cfg) -> params tree of jax.ShapeDtypeStruct (no FLOPs, no memory).
  check_params(cfg, tree, where) -> None: the same check for a params tree (or its shapes).
  stored_config(d: dict, where) -> ModelConfig from checkpoint metadata, refused clearly.

`convert.inspect_hf(dir)` applies these to a Hugging Face folder (config.json plus the
safetensors headers; no tensor read).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from recycle_jax.models import transformer
from recycle_jax.runtime.registry import Registry
from recycle_jax.runtime.errors import UserError, check

FULL, SLIDING = transformer.FULL, transformer.SLIDING
# Buffers some exports carry; recomputed by the model, so skipped when reading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = ("float32", "bfloat16", "float16")
_UNSUPPORTED = "recycle_jax's model does not implement it; convert a supported variant"


class TensorMap(NamedTuple):
  """One parameter: its Hugging Face tensor name, flax key path and orientation."""
  hf_name: str
  path: tuple[str, ...]
  transpose: bool

  def to_param(self, x: np.ndarray) -> np.ndarray:
    return x.T if self.transpose else x

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.T if self.transpose else x

  def hf_shape(self, param_shape: tuple) -> tuple:
    return tuple(param_shape)[::-1] if self.transpose else tuple(param_shape)


class Fields:
  """A config.json dict read for one family: its defaults fill absent keys."""

  def __init__(self, hf: dict, where: str, family: "Family"):
    self.hf, self.where, self.family = hf, where, family

  def get(self, key: str, default: Any = None) -> Any:
    return self.hf[key] if key in self.hf else self.family.defaults.get(key, default)

  def need(self, cond: bool, what: str, fix: str = _UNSUPPORTED) -> None:
    check(cond, what, self.where, fix)

  def int_(self, key: str, lo: int = 1) -> int:
    v = self.get(key)
    self.need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
              f"{key} {v!r} is not an integer >= {lo}", "fix config.json")
    return v

  def float_(self, key: str, positive: bool = True) -> float | None:
    v = self.get(key)
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) and (v > 0 or not positive))
    self.need(ok, f"{key} {v!r} is not a finite positive number", "fix config.json")
    return None if v is None else float(v)

  def is_(self, key: str, allowed: tuple, what: str = "") -> Any:
    v = self.get(key)
    self.need(v in allowed, f"{key} {v!r} is not supported by family "
              f"{self.family.name!r}{what} (supported: {list(allowed)})")
    return v


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face architecture (see the module docstring)."""
  name: str  # ModelConfig.family
  model_type: str  # config.json model_type, read and written
  architecture: str  # config.json architectures[0] on export
  read: Callable[[Fields], dict]  # family-specific ModelConfig fields from config.json
  write: Callable[[transformer.ModelConfig], dict]  # family-specific config.json fields
  defaults: Mapping[str, Any]  # transformers' config-class defaults for absent keys
  tiny: Mapping[str, Any]  # a small config.json of this family, for the parity tests
  norms: tuple[tuple[str, str], ...] = (("attn_norm", "input_layernorm"),
                                        ("mlp_norm", "post_attention_layernorm"))
  token_ids: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # export defaults
  reads: bool = True  # False: written only (model_type belongs to another family)


# ----------------------------------------------------------------------------- pieces

def _rope(f: Fields, params: dict | None = None) -> dict:
  """ModelConfig RoPE fields from a rope_parameters dict (or the legacy rope_scaling)."""
  rp = params if params is not None else (
      f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {})
  f.need(isinstance(rp, dict), f"rope_parameters {rp!r} is not an object", "fix config.json")
  kind = rp.get("rope_type", rp.get("type", "default"))
  f.need(kind in transformer.ROPE_TYPES, f"RoPE scaling {kind!r} is not supported by family "
         f"{f.family.name!r} (supported: {list(transformer.ROPE_TYPES)})")
  partial = rp.get("partial_rotary_factor", f.hf.get("partial_rotary_factor", 1.0))
  f.need(partial == 1.0, f"partial_rotary_factor {partial!r} is not supported")
  theta = rp.get("rope_theta", f.get("rope_theta"))
  f.need(isinstance(theta, (int, float)) and theta > 0, f"rope_theta {theta!r} is not "
         "a positive number", "fix config.json")
  out = {"rope_theta": float(theta), "rope_type": kind}
  if kind != "default":
    factor = rp.get("factor")
    f.need(isinstance(factor, (int, float)) and factor >= 1,
           f"rope factor {factor!r} of {kind!r} RoPE is not a number >= 1", "fix config.json")
    out["rope_factor"] = float(factor)
  if kind == "llama3":
    original = rp.get("original_max_position_embeddings", f.get("max_position_embeddings"))
    lo, hi = rp.get("low_freq_factor"), rp.get("high_freq_factor")
    f.need(isinstance(original, int) and all(isinstance(x, (int, float)) for x in (lo, hi))
           and 0 < lo < hi, f"llama3 RoPE needs low_freq_factor < high_freq_factor and "
           f"original_max_position_embeddings (got {lo!r}, {hi!r}, {original!r})",
           "fix config.json")
    out.update(rope_low_freq_factor=float(lo), rope_high_freq_factor=float(hi),
               rope_original_max_positions=original)
  return out


def _rope_params(cfg: transformer.ModelConfig) -> dict:
  out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    out["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out


def _no_bias(f: Fields, *keys: str) -> None:
  for key in keys:
    f.need(not f.get(key), f"{key} {f.get(key)!r}: biases are not supported by family "
           f"{f.family.name!r}")


def _layer_types(f: Fields, window: int | None, derive: Callable[[int], str],
                 listed: bool = True) -> dict:
  """sliding_window and per-layer kinds: config.json's layer_types (if the family reads
  it: `listed`), else `derive(i)`."""
  n = f.int_("num_hidden_layers")
  kinds = f.get("layer_types") if listed else None
  if kinds is None:
    kinds = [derive(i) for i in range(n)]
  f.need(isinstance(kinds, list) and len(kinds) == n and set(kinds) <= {FULL, SLIDING},
         f"layer_types {kinds!r} is not one of {[FULL, SLIDING]} per layer")
  if SLIDING not in kinds:
    return {"sliding_window": None, "layer_types": tuple(kinds)}
  f.need(isinstance(window, int) and window >= 1,
         f"sliding_window {window!r} is not a positive integer", "fix config.json")
  return {"sliding_window": window, "layer_types": tuple(kinds)}


def _llama_read(f: Fields) -> dict:
  f.is_("hidden_act", ("silu",))
  _no_bias(f, "attention_bias", "mlp_bias")
  return {}


def _llama_write(cfg: transformer.ModelConfig) -> dict:
  return {"hidden_act": cfg.activation, "attention_bias": False, "mlp_bias": False}


def _mistral_read(f: Fields) -> dict:
  f.is_("hidden_act", ("silu",))
  window = f.get("sliding_window")
  # transformers' Mistral windows every layer and ignores layer_types.
  return _layer_types(f, window, lambda i: SLIDING if window is not None else FULL,
                      listed=False)


def _mistral_write(cfg: transformer.ModelConfig) -> dict:
  return {"hidden_act": cfg.activation, "sliding_window": cfg.sliding_window}


def _qwen_read(f: Fields) -> dict:
  """Qwen2 and Qwen3: windows only with use_sliding_window, on layers >= max_window_layers."""
  f.is_("hidden_act", ("silu",))
  if not f.get("use_sliding_window"):
    kinds = f.get("layer_types")
    f.need(kinds is None or SLIDING not in kinds, "layer_types has sliding layers but "
           "use_sliding_window is false", "fix config.json")
    return {"sliding_window": None, "layer_types": ()}
  start = f.int_("max_window_layers", lo=0)
  return _layer_types(f, f.get("sliding_window"), lambda i: SLIDING if i >= start else FULL)


def _qwen_write(cfg: transformer.ModelConfig) -> dict:
  sliding = SLIDING in cfg.layer_types
  return {"hidden_act": cfg.activation, "use_sliding_window": sliding,
          "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
          "max_window_layers": (cfg.layer_types.index(SLIDING) if sliding
                                else cfg.num_layers)}


def _qwen2_read(f: Fields) -> dict:
  return {**_qwen_read(f), "qkv_bias": True}


def _qwen3_read(f: Fields) -> dict:
  _no_bias(f, "attention_bias")  # Qwen3's attention_bias also puts one on o_proj
  return {**_qwen_read(f), "qk_norm": True}


def _qwen3_write(cfg: transformer.ModelConfig) -> dict:
  return {**_qwen_write(cfg), "attention_bias": False}


GEMMA_NORMS = (("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
               ("mlp_norm", "pre_feedforward_layernorm"),
               ("mlp_post_norm", "post_feedforward_layernorm"))


def _gemma_read(f: Fields, every: int) -> dict:
  """Gemma 2 and 3: layer i is global when (i + 1) % every == 0, unless layer_types says."""
  f.is_("hidden_activation", ("gelu_pytorch_tanh",))
  _no_bias(f, "attention_bias")
  f.need(not f.get("use_bidirectional_attention"), "use_bidirectional_attention is "
         f"not supported by family {f.family.name!r}")
  kinds = _layer_types(f, f.get("sliding_window"),
                       lambda i: FULL if (i + 1) % every == 0 else SLIDING)
  return {**kinds, "activation": "gelu_pytorch_tanh", "norm_offset": 1.0,
          "sandwich_norms": True, "embed_scale": True,
          "query_scale": f.float_("query_pre_attn_scalar"),
          "attn_softcap": f.float_("attn_logit_softcapping"),
          "final_softcap": f.float_("final_logit_softcapping")}


def _int_if_whole(x: float | None) -> float | int | None:
  return int(x) if x is not None and float(x).is_integer() else x  # transformers wants int


def _gemma_write(cfg: transformer.ModelConfig) -> dict:
  return {"hidden_activation": cfg.activation, "attention_bias": False,
          "query_pre_attn_scalar": _int_if_whole(cfg.query_scale),
          "sliding_window": cfg.sliding_window,
          "layer_types": list(cfg.layer_types), "attn_logit_softcapping": cfg.attn_softcap,
          "final_logit_softcapping": cfg.final_softcap}


def _gemma3_read(f: Fields) -> dict:
  """Gemma 3 adds q/k norms and a second RoPE: unscaled with its own base on local layers.

  rope_parameters is keyed by layer kind; older configs give rope_theta and rope_scaling
  for the global layers and rope_local_base_freq for the local ones."""
  out = {**_gemma_read(f, f.int_("sliding_window_pattern")), "qk_norm": True}
  rp = f.hf.get("rope_parameters")
  if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):
    local = _rope(f, {**(rp.get(SLIDING) or {}), "rope_theta": (rp.get(SLIDING) or {}).get(
        "rope_theta", f.get("rope_local_base_freq"))})
    out.update(_rope(f, {"rope_theta": f.get("rope_theta"), **(rp.get(FULL) or {})}))
  else:
    local = _rope(f, {"rope_theta": f.get("rope_local_base_freq")})
    out.update(_rope(f, {"rope_theta": f.get("rope_theta"), **(f.hf.get("rope_scaling")
                                                              or {})}))
  f.need(local["rope_type"] == "default", f"RoPE scaling {local['rope_type']!r} on "
         "sliding layers is not supported by family 'gemma3_text'")
  return {**out, "local_rope_theta": local["rope_theta"]}


def _gemma3_write(cfg: transformer.ModelConfig) -> dict:
  return {**_gemma_write(cfg), "rope_parameters": {
      FULL: _rope_params(cfg),
      SLIDING: {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}}


# transformers 5.23's config-class defaults for the keys the readers consult.
_LLAMA = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "rope_theta": 10_000.0, "max_position_embeddings": 2048}
_GEMMA = {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
          "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
          "sliding_window": 4096}
# The tiny configs: windows shorter than the tests' sequences, explicit head_dim where
# the family allows it, non-default RoPE.
_TINY = {"vocab_size": 384, "hidden_size": 48, "intermediate_size": 80,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}

REGISTRY: Registry[Family] = Registry("model family")
for _f in [
    Family("byte", "llama", "LlamaForCausalLM", _llama_read, _llama_write, _LLAMA,
           tiny={**_TINY, "vocab_size": transformer.BYTE_VOCAB_SIZE, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}},
           token_ids={"bos_token_id": None, "eos_token_id": transformer.EOS_ID,
                      "pad_token_id": transformer.PAD_ID}, reads=False),
    Family("llama", "llama", "LlamaForCausalLM", _llama_read, _llama_write, _LLAMA,
           tiny={**_TINY, "head_dim": 16, "rope_parameters": _LLAMA3_ROPE}),
    Family("mistral", "mistral", "MistralForCausalLM", _mistral_read, _mistral_write,
           {**_LLAMA, "max_position_embeddings": 131_072, "sliding_window": 4096},
           tiny={**_TINY, "head_dim": 8, "sliding_window": 5}),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", _qwen2_read, _qwen_write,
           {**_LLAMA, "max_position_embeddings": 32_768, "max_window_layers": 28},
           tiny={**_TINY, "tie_word_embeddings": True, "use_sliding_window": True,
                 "sliding_window": 6, "max_window_layers": 1,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", _qwen3_read, _qwen3_write,
           {**_LLAMA, "max_position_embeddings": 32_768, "max_window_layers": 28,
            "head_dim": 128},
           tiny={**_TINY, "head_dim": 16,
                 "rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0,
                                     "factor": 2.0}}),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", lambda f: _gemma_read(f, 2),
           _gemma_write, {**_GEMMA, "max_position_embeddings": 8192,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
           tiny={**_TINY, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 5,
                 "attn_logit_softcapping": 4.0, "final_logit_softcapping": 10.0},
           norms=GEMMA_NORMS),
    Family("gemma3_text", "gemma3_text", "Gemma3ForCausalLM", _gemma3_read, _gemma3_write,
           {**_GEMMA, "max_position_embeddings": 131_072, "sliding_window_pattern": 6,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
           tiny={**_TINY, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 5,
                 "query_pre_attn_scalar": 16,
                 "layer_types": [SLIDING, FULL, SLIDING, FULL],
                 "rope_parameters": {
                     FULL: {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0},
                     SLIDING: {"rope_type": "default", "rope_theta": 50.0}}},
           norms=GEMMA_NORMS),
]:
  REGISTRY.register(_f)
_BY_MODEL_TYPE = {f.model_type: f for f in REGISTRY.values() if f.reads}
FAMILY_KEY = "recycle_jax_family"  # in config.json when model_type alone is ambiguous


get = REGISTRY.get


# ----------------------------------------------------------------------------- configs

def from_hf_config(hf: dict, where: str) -> tuple[Family, transformer.ModelConfig]:
  """(family, ModelConfig) for a config.json dict; refuses what the model cannot reproduce."""
  check(isinstance(hf, dict), "config.json is not a JSON object", where,
        "export the model with transformers' save_pretrained")
  mt = hf.get("model_type")
  named = hf.get(FAMILY_KEY)
  fam = (REGISTRY[named] if isinstance(named, str) and named in REGISTRY else None) or (
      _BY_MODEL_TYPE.get(mt) if isinstance(mt, str) else None)
  check(fam is not None and fam.model_type == mt,
        f"model_type {mt!r} is not a supported family", where,
        f"recycle_jax reads {', '.join(sorted(_BY_MODEL_TYPE))}")
  f = Fields(hf, where, fam)
  f.need("quantization_config" not in hf, "quantized weights (quantization_config) are "
         "not supported", "convert the unquantized model")
  d, h = f.int_("hidden_size"), f.int_("num_attention_heads")
  kv = f.get("num_key_value_heads") or h
  f.need(isinstance(kv, int) and kv >= 1 and h % kv == 0,
         f"num_attention_heads {h} is not a multiple of num_key_value_heads {kv!r}",
         "fix config.json")
  head_dim = f.get("head_dim") or d // h
  f.need(isinstance(head_dim, int) and head_dim >= 2 and head_dim % 2 == 0,
         f"head_dim {head_dim!r} is not an even integer", "fix config.json")
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  f.need(dtype in DTYPES, f"dtype {dtype!r} is not supported (supported: {list(DTYPES)})")
  kw = dict(family=fam.name, vocab_size=f.int_("vocab_size"), d_model=d,
            num_layers=f.int_("num_hidden_layers"), num_heads=h, num_kv_heads=kv,
            d_ff=f.int_("intermediate_size"), head_dim=head_dim,
            tie_embeddings=bool(f.get("tie_word_embeddings")),
            norm_eps=f.float_("rms_norm_eps"),
            max_position_embeddings=f.int_("max_position_embeddings"), dtype=dtype)
  kw.update(_rope(f))
  kw.update(fam.read(f))
  return fam, transformer.ModelConfig(**kw)


def to_hf_config(cfg: transformer.ModelConfig, base: dict | None = None) -> dict:
  """config.json for `cfg`; `base` (the original config.json, if any) keeps its token ids."""
  fam = get(cfg.family)
  keep = {k: v for k, v in (base or {}).items() if k in fam.token_ids or k.endswith(
      "_token_id")}
  out = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
         **fam.token_ids, **keep,
         "architectures": [fam.architecture], "model_type": fam.model_type,
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
         "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
         "max_position_embeddings": cfg.max_position_embeddings,
         "rope_theta": cfg.rope_theta, "rope_parameters": _rope_params(cfg),
         "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.dtype,
         "torch_dtype": cfg.dtype, **fam.write(cfg)}
  if fam.name != fam.model_type:
    out[FAMILY_KEY] = fam.name
  return out


# ----------------------------------------------------------------------------- tensors

def tensor_map(cfg: transformer.ModelConfig) -> list[TensorMap]:
  """(HF tensor name, flax param path, transposed) for every parameter of `cfg`."""
  fam = get(cfg.family)
  out = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), False)]
  for i in range(cfg.num_layers):
    hf, fx = f"model.layers.{i}.", f"layer_{i}"
    for p in "qkvo":
      out.append(TensorMap(f"{hf}self_attn.{p}_proj.weight", (fx, "attn", p, "kernel"), True))
      if cfg.qkv_bias and p != "o":
        out.append(TensorMap(f"{hf}self_attn.{p}_proj.bias", (fx, "attn", p, "bias"), False))
    if cfg.qk_norm:
      for p in "qk":
        out.append(TensorMap(f"{hf}self_attn.{p}_norm.weight",
                             (fx, "attn", f"{p}_norm", "scale"), False))
    for p in ("gate", "up", "down"):
      out.append(TensorMap(f"{hf}mlp.{p}_proj.weight", (fx, p, "kernel"), True))
    for ours, theirs in fam.norms:
      if ours in ("attn_norm", "mlp_norm") or cfg.sandwich_norms:
        out.append(TensorMap(f"{hf}{theirs}.weight", (fx, ours, "scale"), False))
  out.append(TensorMap("model.norm.weight", ("final_norm", "scale"), False))
  if not cfg.tie_embeddings:
    out.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), True))
  return out


def param_shapes(cfg: transformer.ModelConfig):
  """The params tree of `cfg` as jax.ShapeDtypeStruct leaves (nothing computed)."""
  return jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))


def get_path(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def check_tensors(cfg: transformer.ModelConfig, shapes: Mapping[str, tuple], where: str) -> None:
  """Refuses tensors missing, unexpected, or shaped unlike config.json implies."""
  fix = "the weights do not match config.json"
  abstract = param_shapes(cfg)
  used = set()
  for t in tensor_map(cfg):
    check(t.hf_name in shapes, f"tensor {t.hf_name!r} is missing", where, fix)
    got, want = tuple(shapes[t.hf_name]), t.hf_shape(get_path(abstract, t.path).shape)
    check(got == want, f"tensor {t.hf_name!r} has shape {got}, config.json implies {want}",
          where, fix)
    used.add(t.hf_name)
  extra = sorted(k for k in shapes if k not in used and not k.endswith(IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and k == "lm_head.weight"))
  check(not extra, f"unexpected tensors {extra[:3]}{'...' if len(extra) > 3 else ''}", where,
        f"family {cfg.family!r} has no such parameters; is config.json this model's?")


def check_params(cfg: transformer.ModelConfig, tree, where: str) -> None:
  """Refuses a params tree (arrays or shapes) whose keys or shapes are not `cfg`'s."""
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
          jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}
  got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
         jax.tree_util.tree_leaves_with_path(tree)}
  for key in sorted(set(want) | set(got)):
    check(key in got and key in want and got[key] == want[key],
          f"parameter {key} is {got.get(key, 'missing')}, its model config implies "
          f"{want.get(key, 'no such parameter')}", where,
          "the checkpoint's parameters do not match its recorded model config")


def stored_config(d: Any, where: str) -> transformer.ModelConfig:
  """ModelConfig from a checkpoint's metadata dict; older dicts lack the newer fields."""
  check(isinstance(d, dict), "checkpoint has no recycle_jax model config", where,
        "write it with recycle_jax (or `recycle-jax convert` for Hugging Face models)")
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(transformer.ModelConfig)})
  check(not unknown, f"model config has unknown fields {unknown}", where,
        "it was written by a newer recycle_jax; upgrade")
  get(d.get("family", "byte"), where)
  try:
    return transformer.ModelConfig(**d)
  except (TypeError, ValueError) as e:
    raise UserError(f"model config is invalid: {e}", where,
                    "the checkpoint's metadata is damaged") from None
