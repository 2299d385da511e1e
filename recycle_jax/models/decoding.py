"""Greedy decoding on device for `generate` tasks: KV cache, EOS and stop sequences.

`generate(decoder, params, g)` decodes at most `g.max_new` tokens for every prompt of a
`Prompts` batch. It is a `lax.while_loop` over steps that exits as soon as every row has
finished (a stop sequence's token ids at the end of its output; the vocabulary's EOS is
one, `stop_ids`), so a batch whose answers are short costs short decoding; a finished
row's later tokens are NO_TOKEN. Rows are
independent, so a batch split over the mesh's 'data' axis decodes each replica's share.

Stop sequences are matched on token ids (exact for a byte vocabulary; for a subword one a
stop string may tokenize differently in context, which only costs decoding work: the text
is cut at the stop string on the host, `scoring.truncate`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.models import transformer

NO_TOKEN = -1  # pads of stop-id rows (matches nothing) and outputs after a row finished


@flax.struct.dataclass
class Prompts:
  """E prompts of one task split. prompts [E, Lp] right-padded, prompt_lens [E] (0 marks a
  padding row: finished before it starts),
  stop_ids [S, Ls]: stop sequences' token ids, right-aligned, left-padded with NO_TOKEN
  (S >= 1; an all-NO_TOKEN row never matches)."""
  prompts: jax.Array
  prompt_lens: jax.Array
  stop_ids: jax.Array
  max_new: int = flax.struct.field(pytree_node=False, default=32)


def stop_ids(encoded: list[list[int]], eos_id: int | None = None) -> np.ndarray:
  """[S, Ls] right-aligned token ids of the stop sequences, the vocabulary's EOS first
  when given (one NO_TOKEN row if none)."""
  encoded = ([[eos_id]] if eos_id is not None else []) + [list(e) for e in encoded]
  width = max([len(e) for e in encoded] + [1])
  out = np.full((max(len(encoded), 1), width), NO_TOKEN, np.int32)
  for i, e in enumerate(encoded):
    if e:
      out[i, width - len(e):] = e
  return out


def generate(decoder: transformer.Decoder, params, g: Prompts) -> jax.Array:
  """[E, max_new] greedy continuations (NO_TOKEN after a stop sequence, which is kept)."""
  cfg = decoder.cfg
  e, lp = g.prompts.shape
  s, ls = g.stop_ids.shape
  shape = (e, lp + g.max_new, cfg.num_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
  cache = tuple((zeros, zeros) for _ in range(cfg.num_layers))
  run = lambda tok, pos, cache: decoder.module.apply({"params": params}, tok, pos, cache)
  logits, cache = run(g.prompts, jnp.broadcast_to(jnp.arange(lp), (e, lp)), cache)
  last = jnp.maximum(g.prompt_lens - 1, 0)[:, None, None]
  first = jnp.argmax(jnp.take_along_axis(logits, last, 1)[:, 0], axis=-1).astype(jnp.int32)
  # out keeps ls - 1 columns of NO_TOKEN before the outputs, so a window ending at step t
  # is out[:, t : t + ls] and never reads the prompt.
  out = jnp.full((e, ls - 1 + g.max_new), NO_TOKEN, jnp.int32)
  done = g.prompt_lens <= 0

  def cond(carry):
    t, _, _, _, _, done = carry
    return (t < g.max_new) & ~jnp.all(done)

  def body(carry):
    t, tok, pos, cache, out, done = carry
    tok = jnp.where(done, NO_TOKEN, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, ls - 1 + t))
    window = jax.lax.dynamic_slice(out, (0, t), (e, ls))  # [E, Ls]: the last ls outputs
    hit = jnp.all((window[:, None, :] == g.stop_ids[None]) | (g.stop_ids[None] == NO_TOKEN),
                  axis=-1) & jnp.any(g.stop_ids != NO_TOKEN, axis=-1)[None]
    done = done | jnp.any(hit, axis=-1)
    logits, cache = run(jnp.maximum(tok, 0)[:, None], pos[:, None], cache)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return t + 1, nxt, pos + 1, cache, out, done

  carry = (jnp.zeros((), jnp.int32), first, g.prompt_lens.astype(jnp.int32), cache, out, done)
  *_, out, _ = jax.lax.while_loop(cond, body, carry)
  return out[:, ls - 1:]


def texts(vocabulary, tokens: np.ndarray) -> list[str]:
  """Decoded continuations [E, T] -> text, each up to its first EOS (NO_TOKEN dropped)."""
  out, eos = [], vocabulary.eos_id
  for row in np.asarray(tokens).tolist():
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    out.append(vocabulary.decode([t for t in row if t >= 0]))
  return out
