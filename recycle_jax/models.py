"""Llama-style decoder-only transformer over bytes, and greedy decoding.

Parameter names follow Hugging Face Llama closely (q/k/v/o, gate/up/down, rotate-half
RoPE, RMSNorm computed in float32) so conversion is a rename plus transposes.

Everything downstream (merging, evaluation, search) only needs
`apply(params, tokens[B, L]) -> logits[B, L, V]`; `Decoder` adds the KV-cache path.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import seqio

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

PAD_ID, EOS_ID = 0, 1
VOCAB = seqio.ByteVocabulary()  # ids = byte + 3; 0 pad, 1 eos, 2 unk


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = VOCAB.vocab_size
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  d_ff: int = 352
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: str = "float32"  # parameter and activation dtype

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention. x: [B, T, H, Dh], positions: [B, T]."""
  half = x.shape[-1] // 2
  freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale * x32.astype(self.dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, name=name, dtype=dtype, param_dtype=dtype,
                  kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] (True = attend).

    With `cache = (k, v)` of shape [B, S, K, Dh], the new keys/values are written at
    `positions` and attention runs over the whole cache.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, _ = x.shape
    h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _dense(h * dh, "q", dt)(x).reshape(b, t, h, dh)
    k = _dense(kh * dh, "k", dt)(x).reshape(b, t, kh, dh)
    v = _dense(kh * dh, "v", dt)(x).reshape(b, t, kh, dh)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    if cache is not None:
      rows = jnp.arange(b)[:, None]
      k = cache[0].at[rows, positions].set(k)
      v = cache[1].at[rows, positions].set(v)
      cache = (k, v)
    q = q.reshape(b, t, kh, h // kh, dh)  # grouped-query: G query heads per kv head
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(dh)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * dh)
    return _dense(cfg.d_model, "o", dt)(out), cache


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    y, cache = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x), positions, mask, cache)
    x = x + y
    y = RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x)
    gate = _dense(cfg.d_ff, "gate", dt)(y)
    up = _dense(cfg.d_ff, "up", dt)(y)
    x = x + _dense(cfg.d_model, "down", dt)(nn.silu(gate) * up)
    return x, cache


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (float32), and the updated cache if given.

  Without a cache, two optional inputs serve packed scoring (evaluation.Packed):
    segments [B, T]: a query attends to earlier keys of segment 0 (a shared prefix) and of
                     its own segment only, so several continuations of one prompt share a
                     row; `positions` [B, T] then gives each token its RoPE position.
    gather [B, S]:   only these positions go through the final norm and the head; the
                     logits are then [B, S, V].
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, cache=None, segments=None, gather=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t = tokens.shape
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
      if segments is not None:
        mask = mask & ((segments[:, None, :] == 0)
                       | (segments[:, None, :] == segments[:, :, None]))
    else:
      s = cache[0][0].shape[1]
      mask = jnp.arange(s)[None, None, :] <= positions[:, :, None]
    x = embed(tokens)
    new_cache = []
    for i in range(cfg.num_layers):
      x, c = Block(cfg, name=f"layer_{i}")(x, positions, mask,
                                           None if cache is None else cache[i])
      new_cache.append(c)
    if gather is not None:
      x = jnp.take_along_axis(x, gather[..., None], axis=1)
    x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(cfg.vocab_size, "lm_head", dt)(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, tuple(new_cache))


def init_params(cfg: ModelConfig, key: jax.Array) -> PyTree:
  return Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]


def make_apply(cfg: ModelConfig) -> ApplyFn:
  """The model as `apply(params, tokens) -> logits`, the only interface merging needs."""
  model = Transformer(cfg)
  return lambda params, tokens: model.apply({"params": params}, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[:, i] | tokens[:, :i]) for i >= 1; position 0 gets 0. Shapes [B, L]."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def _pick_last(logits: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def greedy_decode_uncached(apply: ApplyFn, params: PyTree, prompts: jax.Array,
                           prompt_lens: jax.Array, max_new: int) -> jax.Array:
  """Greedy decoding for any `apply(params, tokens)`, one full forward per token.

  prompts: [B, Lp] right-padded; prompt_lens: [B] (>= 1). Returns [B, max_new].
  Right padding is harmless under a causal mask: pads sit after the read position.
  """
  b, lp = prompts.shape
  buf = jnp.pad(prompts, ((0, 0), (0, max_new)))
  rows = jnp.arange(b)

  def step(buf, t):
    nxt = jnp.argmax(_pick_last(apply(params, buf), prompt_lens - 1 + t), axis=-1)
    return buf.at[rows, prompt_lens + t].set(nxt.astype(buf.dtype)), nxt

  _, out = jax.lax.scan(step, buf, jnp.arange(max_new))
  return out.T.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """The transformer with its KV-cache decoder (fixed maximum length)."""
  cfg: ModelConfig

  @functools.cached_property
  def module(self) -> Transformer:
    return Transformer(self.cfg)

  def apply(self, params: PyTree, tokens: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, tokens)

  def apply_packed(self, params: PyTree, tokens: jax.Array, positions: jax.Array,
                   segments: jax.Array, gather: jax.Array) -> jax.Array:
    """Logits [B, S, V] at the `gather` positions of segment-packed rows (Transformer)."""
    return self.module.apply({"params": params}, tokens, positions, segments=segments,
                             gather=gather)

  def greedy_decode(self, params: PyTree, prompts: jax.Array, prompt_lens: jax.Array,
                    max_new: int) -> jax.Array:
    """Same contract as `greedy_decode_uncached`, with a KV cache of Lp + max_new."""
    cfg = self.cfg
    b, lp = prompts.shape
    shape = (b, lp + max_new, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    cache = tuple((zeros, zeros) for _ in range(cfg.num_layers))
    run = lambda tok, pos, cache: self.module.apply({"params": params}, tok, pos, cache)
    logits, cache = run(prompts, jnp.broadcast_to(jnp.arange(lp), (b, lp)), cache)
    first = jnp.argmax(_pick_last(logits, prompt_lens - 1), axis=-1)

    def step(carry, _):
      tok, pos, cache = carry
      logits, cache = run(tok[:, None], pos[:, None], cache)
      return (jnp.argmax(logits[:, 0], axis=-1), pos + 1, cache), tok

    _, out = jax.lax.scan(step, (first, prompt_lens, cache), None, length=max_new)
    return out.T.astype(jnp.int32)
