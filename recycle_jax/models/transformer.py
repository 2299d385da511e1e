"""One decoder-only transformer for every model family, and greedy decoding.

The byte-level model recycle_jax trains for its own pools is Llama-shaped: q/k/v/o,
gate/up/down, rotate-half RoPE, RMSNorm computed in float32. The Hugging Face families
(`families.py`: Llama 3, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3) differ from it only by the
flags of `ModelConfig` (biases, q/k norms, norm offset, sandwich norms, embedding scale,
activation, soft-capping, sliding windows, RoPE scaling): one implementation, no copy per
family. Parameter names follow Hugging Face closely, so conversion is a rename plus
transposes (`families.tensor_map`).

Everything downstream (merging, evaluation, search) only needs
`apply(params, tokens[B, L]) -> logits[B, L, V]`; `Decoder` adds the KV-cache path.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from recycle_jax.models.byte_vocab import BYTE_VOCAB_SIZE, EOS_ID, PAD_ID  # noqa: F401 (transformer.EOS_ID)

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def __getattr__(name: str):
  """`models.VOCAB`, the byte vocabulary, built on first use: seqio imports TensorFlow,
  which `merge` and `convert` of other families never need."""
  if name == "VOCAB":
    import seqio
    globals()["VOCAB"] = vocab = seqio.ByteVocabulary()
    assert vocab.vocab_size == BYTE_VOCAB_SIZE
    return vocab
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

FULL, SLIDING = "full_attention", "sliding_attention"  # layer kinds, Hugging Face's names
ACTIVATIONS = {"silu": nn.silu,  # Hugging Face's names for the gated MLP's activation
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture. Defaults are the byte-level model; every field added since keeps
  the old behaviour by default, so configs stored in older checkpoints still load."""
  vocab_size: int = BYTE_VOCAB_SIZE
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  d_ff: int = 352
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: str = "float32"  # parameter and activation dtype
  family: str = "byte"  # a key of families.REGISTRY: how this config maps to Hugging Face
  head_dim: int | None = None  # None: d_model // num_heads
  max_position_embeddings: int = 4096  # informational (RoPE needs no table); kept for export
  activation: str = "silu"  # a key of ACTIVATIONS
  qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3)
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + scale) (Gemma: 1)
  sandwich_norms: bool = False  # also normalize the attention and MLP outputs (Gemma)
  embed_scale: bool = False  # embeddings times sqrt(d_model), rounded to dtype (Gemma)
  query_scale: float | None = None  # scores / sqrt(this); None: sqrt(head_dim)
  attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
  final_softcap: float | None = None  # the same on the output logits (Gemma 2)
  sliding_window: int | None = None  # SLIDING layers see the last `sliding_window` keys
  layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () = all SLIDING with a
  # window, all FULL without one
  rope_type: str = "default"  # a member of ROPE_TYPES (Hugging Face's rope_type)
  rope_factor: float = 1.0  # linear and llama3
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_positions: int = 8192  # llama3
  local_rope_theta: float | None = None  # SLIDING layers' base, unscaled RoPE (Gemma 3);
  # None: they use the FULL layers' RoPE
  scan_layers: bool = False  # run the blocks under nn.scan (one compiled block, so compile
  # time stays flat in depth); parameters keep the unrolled layer_{i} tree (Decoder.prepare)

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.head_dim is None:
      set_("head_dim", self.d_model // self.num_heads)
    kinds = tuple(self.layer_types) or (
        (SLIDING if self.sliding_window else FULL),) * self.num_layers
    set_("layer_types", kinds)  # a tuple (JSON gives a list), so the config stays hashable
    if len(kinds) != self.num_layers or not set(kinds) <= {FULL, SLIDING}:
      raise ValueError(f"layer_types {kinds} must be {FULL!r} or {SLIDING!r} per layer")
    if SLIDING in kinds and not self.sliding_window:
      raise ValueError("sliding layers need a sliding_window")
    if self.activation not in ACTIVATIONS or self.rope_type not in ROPE_TYPES:
      raise ValueError(f"activation {self.activation!r} or rope_type {self.rope_type!r}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def rope_frequencies(cfg: ModelConfig, kind: str = FULL) -> jax.Array:
  """Inverse frequencies [head_dim // 2] of a layer of `kind`, as transformers computes them."""
  dim = cfg.head_dim
  local = kind == SLIDING and cfg.local_rope_theta is not None
  theta = cfg.local_rope_theta if local else cfg.rope_theta
  freqs = 1.0 / theta ** (jnp.arange(dim // 2, dtype=jnp.float32) * 2 / dim)
  if local or cfg.rope_type == "default":
    return freqs
  if cfg.rope_type == "linear":
    return freqs / cfg.rope_factor
  # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
  factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old = cfg.rope_original_max_positions
  wavelen = 2 * math.pi / freqs
  scaled = jnp.where(wavelen > old / lo, freqs / factor, freqs)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
  return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention. x: [B, T, H, Dh], positions: [B, T]."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  offset: float = 0.0  # Gemma stores scale - 1 and computes in float32 before the cast

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (x32 * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
    return scale * x32.astype(self.dtype)


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
  return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), cfg.norm_offset, name=name)


def _dense(features: int, name: str, dtype, bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, name=name, dtype=dtype, param_dtype=dtype,
                  kernel_init=nn.initializers.normal(0.02))


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array) -> jax.Array:
  """Grouped-query attention. q [B, T, H, Dh], k and v [B, S, K, Dh], mask [B, T, S]
  (True = attend) -> [B, T, H, Dh]. Through `jax.nn.dot_product_attention` (XLA's fused
  softmax on CPU and TPU; cuDNN's flash attention on GPU for 16-bit dtypes where it
  accepts the shapes); soft-capped scores (Gemma 2) take the explicit einsum path."""
  dt, dh = q.dtype, cfg.head_dim
  scale = 1.0 / math.sqrt(cfg.query_scale or dh)
  if cfg.attn_softcap is None:
    impls = ["xla"]
    if jax.default_backend() == "gpu" and dt in (jnp.bfloat16, jnp.float16):
      impls.insert(0, "cudnn")
    for impl in impls:
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation=impl)
      except (ValueError, NotImplementedError, RuntimeError):  # cuDNN refused the shapes
        if impl == impls[-1]:
          raise
  b, t, h, _ = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, h // kh, dh)  # grouped-query: G query heads per kv head
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
  logits = softcap(logits, cfg.attn_softcap)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dt)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, freqs, cache=None):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] (True = attend); freqs: RoPE's
    inverse frequencies [Dh // 2] (`rope_frequencies` of the layer's kind).

    With `cache = (k, v)` of shape [B, S, K, Dh], the new keys/values are written at
    `positions` and attention runs over the whole cache.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, _ = x.shape
    h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _dense(h * dh, "q", dt, cfg.qkv_bias)(x).reshape(b, t, h, dh)
    k = _dense(kh * dh, "k", dt, cfg.qkv_bias)(x).reshape(b, t, kh, dh)
    v = _dense(kh * dh, "v", dt, cfg.qkv_bias)(x).reshape(b, t, kh, dh)
    if cfg.qk_norm:
      q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
    q, k = rope(q, positions, freqs), rope(k, positions, freqs)
    if cache is not None:
      rows = jnp.arange(b)[:, None]
      k = cache[0].at[rows, positions].set(k)
      v = cache[1].at[rows, positions].set(v)
      cache = (k, v)
    out = attention(cfg, q, k, v, mask).reshape(b, t, h * dh)
    return _dense(cfg.d_model, "o", dt)(out), cache


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, freqs, cache=None):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    y, cache = Attention(cfg, name="attn")(
        _norm(cfg, "attn_norm")(x), positions, mask, freqs, cache)
    if cfg.sandwich_norms:
      y = _norm(cfg, "attn_post_norm")(y)
    x = x + y
    y = _norm(cfg, "mlp_norm")(x)
    gate = _dense(cfg.d_ff, "gate", dt)(y)
    up = _dense(cfg.d_ff, "up", dt)(y)
    y = _dense(cfg.d_model, "down", dt)(ACTIVATIONS[cfg.activation](gate) * up)
    if cfg.sandwich_norms:
      y = _norm(cfg, "mlp_post_norm")(y)
    return x + y, cache


class _ScannedBlock(nn.Module):
  """One step of the scanned layer stack: a Block whose kind is a traced flag, choosing
  between the FULL and SLIDING masks and RoPE frequencies (computed once, broadcast)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer, positions, masks, freqs):
    sliding, cache = layer
    pick = lambda pair: jnp.where(sliding, pair[1], pair[0])
    return Block(self.cfg, name="block")(x, positions, pick(masks), pick(freqs), cache)


SCANNED = "layers"  # the scanned stack's parameters: {SCANNED: {"block": [L, ...] leaves}}


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (float32), and the updated cache if given.

  Without a cache, two optional inputs serve packed scoring (evaluation.Packed):
    segments [B, T]: a query attends to earlier keys of segment 0 (a shared prefix) and of
                     its own segment only, so several continuations of one prompt share a
                     row; `positions` [B, T] then gives each token its RoPE position.
    gather [B, S]:   only these positions go through the final norm and the head; the
                     logits are then [B, S, V].
  With a cache, `gather` [B, S] likewise picks the positions whose logits prefill needs.
  head=False returns the final-normed hidden states [B, S, D] instead of logits
  (`scored_tokens` runs the head over the vocabulary in chunks).
  Sliding layers also mask keys `sliding_window` or more positions behind the query.
  With cfg.scan_layers the blocks run under nn.scan over parameters stacked by
  `stack_layers`, and the cache is (k, v) stacked [L, B, S, K, Dh] (`Decoder`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, cache=None, segments=None, gather=None,
               head=True):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t = tokens.shape
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      key_positions = positions
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
      if segments is not None:
        mask = mask & ((segments[:, None, :] == 0)
                       | (segments[:, None, :] == segments[:, :, None]))
    else:
      key_positions = jnp.arange(cache[0].shape[-3] if cfg.scan_layers
                                 else cache[0][0].shape[1])[None]
      mask = key_positions[:, None, :] <= positions[:, :, None]
    masks = {FULL: mask}
    if SLIDING in cfg.layer_types:
      near = positions[:, :, None] - key_positions[:, None, :] < cfg.sliding_window
      masks[SLIDING] = mask & near
    x = embed(tokens)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
    freqs = {kind: rope_frequencies(cfg, kind) for kind in (FULL, SLIDING)}
    if cfg.scan_layers:
      stack = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers)
      sliding = jnp.array([kind == SLIDING for kind in cfg.layer_types])
      x, new_cache = stack(cfg, name=SCANNED)(
          x, (sliding, cache), positions, (masks[FULL], masks.get(SLIDING, masks[FULL])),
          (freqs[FULL], freqs[SLIDING]))
    else:
      new_cache = []
      for i, kind in enumerate(cfg.layer_types):
        x, c = Block(cfg, name=f"layer_{i}")(x, positions, masks[kind], freqs[kind],
                                             None if cache is None else cache[i])
        new_cache.append(c)
      new_cache = tuple(new_cache)
    if gather is not None:
      x = jnp.take_along_axis(x, gather[..., None], axis=1)
    x = _norm(cfg, "final_norm")(x)
    if not head:
      return x if cache is None else (x, new_cache)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(cfg.vocab_size, "lm_head", dt)(x)
    logits = softcap(logits.astype(jnp.float32), cfg.final_softcap)
    return logits if cache is None else (logits, new_cache)


def init_params(cfg: ModelConfig, key: jax.Array) -> PyTree:
  """Parameters in the one stored layout (layer_{i}, whatever cfg.scan_layers says)."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  return Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]


def stack_layers(cfg: ModelConfig, params: PyTree) -> PyTree:
  """The stored layer_{i} parameters as the scanned stack expects them (one [L, ...]
  leaf per block parameter); unchanged without cfg.scan_layers. Inside a jitted program
  this is one copy of the blocks' weights per call."""
  if not cfg.scan_layers or SCANNED in params:
    return params
  names = [f"layer_{i}" for i in range(cfg.num_layers)]
  rest = {k: v for k, v in params.items() if k not in names}
  blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return {**rest, SCANNED: {"block": blocks}}


def stack_layers_freeing(cfg: ModelConfig, params: dict) -> PyTree:
  """`stack_layers` outside a program, for a run that keeps the stack (eval): each block
  parameter's L per-layer arrays are stacked, then dropped from `params` (emptied), so
  the blocks' weights are in memory about once, not twice."""
  if not cfg.scan_layers or SCANNED in params:
    return params
  flat = [jax.tree_util.tree_flatten(params.pop(f"layer_{i}")) for i in range(cfg.num_layers)]
  leaves, treedef = [f[0] for f in flat], flat[0][1]
  del flat
  stacked = []
  for j in range(len(leaves[0])):
    stacked.append(jnp.stack([layer[j] for layer in leaves]))
    for layer in leaves:
      layer[j] = None  # the only reference: the per-layer array is freed once stacked
  out = {**params, SCANNED: {"block": jax.tree_util.tree_unflatten(treedef, stacked)}}
  params.clear()
  return out


VOCAB_CHUNK = 16384  # vocabulary columns per step of `scored_tokens`


def head_logits(cfg: ModelConfig, params: PyTree, x: jax.Array, start=0,
                size: int | None = None) -> jax.Array:
  """float32 logits [..., size] of vocabulary ids [start, start + size) for final-normed
  hidden states x [..., D], computed as the Transformer's head computes them."""
  dt, size = jnp.dtype(cfg.dtype), size or cfg.vocab_size
  if cfg.tie_embeddings:  # nn.Embed.attend
    w = jax.lax.dynamic_slice_in_dim(params["embed"]["embedding"], start, size, 0)
    logits = jnp.dot(x.astype(dt), w.astype(dt).T)
  else:  # nn.Dense without bias
    w = jax.lax.dynamic_slice_in_dim(params["lm_head"]["kernel"], start, size, 1)
    logits = jnp.dot(x.astype(dt), w.astype(dt))
  return softcap(logits.astype(jnp.float32), cfg.final_softcap)


def scored_tokens(cfg: ModelConfig, params: PyTree, x: jax.Array, tokens: jax.Array,
                  chunk: int = VOCAB_CHUNK) -> tuple[jax.Array, jax.Array]:
  """(log p(tokens), argmax token) [...] from final-normed hidden states x [..., D],
  without the full [..., V] logits: the head runs over the vocabulary in chunks of
  `chunk` columns, carrying a running log-sum-exp, the running argmax (first index on
  ties, as jnp.argmax) and the tokens' own logits."""
  v = cfg.vocab_size
  c = min(chunk, v)
  n = -(-v // c)
  lead = x.shape[:-1]

  def body(carry, i):
    m, s, best, arg, picked = carry
    start = jnp.minimum(i * c, v - c)  # the last chunk overlaps the one before ...
    logits = head_logits(cfg, params, x, start, c)
    ids = start + jnp.arange(c)
    fresh = ids >= i * c  # ... and skips the columns already counted
    live = jnp.where(fresh, logits, -jnp.inf)
    top = jnp.max(live, axis=-1)
    new_m = jnp.maximum(m, top)
    s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(live - new_m[..., None]), axis=-1)
    better = top > best
    arg = jnp.where(better, start + jnp.argmax(live, axis=-1).astype(jnp.int32), arg)
    picked = picked + jnp.sum(jnp.where(fresh & (ids == tokens[..., None]), logits, 0.0),
                              axis=-1)
    return (new_m, s, jnp.maximum(best, top), arg, picked), None

  neg = jnp.full(lead, -jnp.inf, jnp.float32)
  init = (neg, jnp.zeros(lead, jnp.float32), neg, jnp.zeros(lead, jnp.int32),
          jnp.zeros(lead, jnp.float32))
  if n == 1:
    (m, s, _, arg, picked), _ = body(init, jnp.int32(0))
  else:
    (m, s, _, arg, picked), _ = jax.lax.scan(body, init, jnp.arange(n))
  return picked - (m + jnp.log(s)), arg


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

  def prepare(self, params: PyTree) -> PyTree:
    """Stored parameters as the module takes them (`stack_layers`): done once before a
    loop that calls `run`."""
    return stack_layers(self.cfg, params)

  def apply(self, params: PyTree, tokens: jax.Array) -> jax.Array:
    return self.module.apply({"params": self.prepare(params)}, tokens)

  def apply_packed(self, params: PyTree, tokens: jax.Array, positions: jax.Array,
                   segments: jax.Array, gather: jax.Array) -> jax.Array:
    """Logits [B, S, V] at the `gather` positions of segment-packed rows (Transformer)."""
    return self.module.apply({"params": self.prepare(params)}, tokens, positions,
                             segments=segments, gather=gather)

  def score_packed(self, params: PyTree, tokens: jax.Array, positions: jax.Array,
                   segments: jax.Array, gather: jax.Array, targets: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), argmax) [B, S] at the `gather` positions of segment-packed rows,
    the head chunked over the vocabulary (`scored_tokens`): no [B, S, V] logits."""
    x = self.module.apply({"params": self.prepare(params)}, tokens, positions,
                          segments=segments, gather=gather, head=False)
    return scored_tokens(self.cfg, params, x, targets)

  @property
  def cache_axis(self) -> int:
    """The batch axis of the cache's arrays (1 when stacked over layers)."""
    return 1 if self.cfg.scan_layers else 0

  def empty_cache(self, batch: int, length: int):
    """A zero KV cache for `batch` rows of `length` positions."""
    cfg = self.cfg
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
      zeros = jnp.zeros((cfg.num_layers, *shape), jnp.dtype(cfg.dtype))
      return (zeros, zeros)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return tuple((zeros, zeros) for _ in range(cfg.num_layers))

  def run(self, prepared: PyTree, tokens: jax.Array, positions: jax.Array, cache,
          gather: jax.Array | None = None):
    """(logits [B, T or S, V], cache) of one cached step on `prepare`d parameters."""
    return self.module.apply({"params": prepared}, tokens, positions, cache, gather=gather)

  def greedy_decode(self, params: PyTree, prompts: jax.Array, prompt_lens: jax.Array,
                    max_new: int) -> jax.Array:
    """Same contract as `greedy_decode_uncached`, with a KV cache of Lp + max_new."""
    b, lp = prompts.shape
    prepared = self.prepare(params)
    run = functools.partial(self.run, prepared)
    logits, cache = run(prompts, jnp.broadcast_to(jnp.arange(lp), (b, lp)),
                        self.empty_cache(b, lp + max_new), (prompt_lens - 1)[:, None])
    first = jnp.argmax(logits[:, 0], axis=-1)

    def step(carry, _):
      tok, pos, cache = carry
      logits, cache = run(tok[:, None], pos[:, None], cache)
      return (jnp.argmax(logits[:, 0], axis=-1), pos + 1, cache), tok

    _, out = jax.lax.scan(step, (first, prompt_lens, cache), None, length=max_new)
    return out.T.astype(jnp.int32)
