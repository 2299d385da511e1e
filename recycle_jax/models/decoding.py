"""Greedy decoding on device for `generate` tasks: KV cache, EOS and stop sequences.

`generate(decoder, params, g)` decodes at most `g.max_new` tokens for every prompt of a
`Prompts` batch; a finished row's later tokens are NO_TOKEN. A row finishes at EOS or
at a stop sequence, matched two ways:

  stop_ids   [S, Ls]: token-id sequences at the end of the output (EOS is one).
  stop_text  [S', M, V]: stop strings matched on the decoded text's suffix, as the host
             cuts the text (`scoring.truncate`): each row runs one KMP automaton per
             string over its tokens' texts (`stop_tables`), so a token that contains the
             stop counts (Gemma's one "\\n\\n" token ends a row at stop "\\n") and so does
             a stop spread over several tokens.

Cost follows the unfinished rows: decoding runs in stages of halving batch size (E,
E/2, ..., 1 rows; `stage_sizes`); a stage ends when its unfinished rows fit the next one,
then the unfinished rows are moved to the front (their KV cache with them) and the rest
is dropped. Each stage is a `lax.while_loop` that also exits once every row is done, so a
batch whose answers are short costs short decoding. With `groups` = k the E rows are k
independent groups of E/k (the mesh's 'data' shards): rows only move within their group,
so a batch split over 'data' stays where it is.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.models import transformer

NO_TOKEN = -1  # pads of stop-id rows (matches nothing) and outputs after a row finished
HIT = -1  # a stop_text state: the stop string was matched


@flax.struct.dataclass
class Prompts:
  """E prompts of one task split. prompts [E, Lp] right-padded, prompt_lens [E] (0 marks a
  padding row: finished before it starts),
  stop_ids [S, Ls]: stop sequences' token ids, right-aligned, left-padded with NO_TOKEN
  (S >= 1; an all-NO_TOKEN row never matches);
  stop_text [S', 1 + M, V] (optional): `stop_tables` of stop strings;
  groups: rows [E] are `groups` equal blocks that never exchange rows (E % groups == 0)."""
  prompts: jax.Array
  prompt_lens: jax.Array
  stop_ids: jax.Array
  max_new: int = flax.struct.field(pytree_node=False, default=32)
  stop_text: jax.Array | None = None
  groups: int = flax.struct.field(pytree_node=False, default=1)


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


def token_texts(vocabulary) -> tuple[list[str], list[str]]:
  """Each token's text (V), (as the first token of a text, after another token): the
  second is decode([anchor, v]) less decode([anchor]), so a SentencePiece token keeps the
  leading space the first position drops."""
  n = vocabulary.vocab_size
  backend = getattr(vocabulary, "tokenizer", None)  # HFVocabulary: batched decoding
  if backend is not None and hasattr(backend, "decode_batch"):
    decode_many = lambda rows: backend.decode_batch(rows, skip_special_tokens=True)
  else:
    decode_many = lambda rows: [vocabulary.decode(r) for r in rows]
  anchor = vocabulary.encode("a")[-1:]
  first = decode_many([[v] for v in range(n)])
  head = decode_many([anchor])[0]
  pairs = decode_many([anchor + [v] for v in range(n)])
  after = [p[len(head):] if p.startswith(head) else f for p, f in zip(pairs, first)]
  return first, after


def _kmp_step(stop: str, fail: list[int], q: int, text: str) -> int:
  """The automaton's state after `text` from state q (HIT once `stop` is matched)."""
  for ch in text:
    while q and stop[q] != ch:
      q = fail[q - 1]
    q += stop[q] == ch
    if q == len(stop):
      return HIT
  return q


def stop_tables(vocabulary, stops: tuple[str, ...]) -> np.ndarray | None:
  """[S, 1 + M, V] automaton tables of non-empty stop strings (M: the longest): row 0 is
  the transition of a text's first token from state 0; row 1 + q the transition from
  state q (the length of the stop's longest prefix that ends the text so far). HIT: the
  text now contains the stop. None without stops."""
  if not stops:
    return None
  first, after = token_texts(vocabulary)
  m = max(map(len, stops))
  dtype = np.int8 if m < 127 else np.int16
  out = np.zeros((len(stops), 1 + m, len(first)), dtype)
  for s, stop in enumerate(stops):
    fail, k = [0] * len(stop), 0  # KMP failure function
    for i in range(1, len(stop)):
      while k and stop[i] != stop[k]:
        k = fail[k - 1]
      k += stop[i] == stop[k]
      fail[i] = k
    chars = set(stop)
    for v, (t0, t) in enumerate(zip(first, after)):
      if chars.isdisjoint(t0) and chars.isdisjoint(t):
        continue  # leaves every state at 0 (its last character is not in the stop)
      out[s, 0, v] = _kmp_step(stop, fail, 0, t0)
      for q in range(len(stop)):
        out[s, 1 + q, v] = _kmp_step(stop, fail, q, t)
  return out


def stage_sizes(rows: int) -> tuple[int, ...]:
  """Batch sizes of the decoding stages: rows, then halving (rounded up) down to 1."""
  sizes = [rows]
  while sizes[-1] > 1:
    sizes.append(-(-sizes[-1] // 2))
  return tuple(sizes)


def generate(decoder: transformer.Decoder, params, g: Prompts) -> jax.Array:
  """[E, max_new] greedy continuations (NO_TOKEN after a stop sequence, which is kept)."""
  k = g.groups
  e, lp = g.prompts.shape
  s, ls = g.stop_ids.shape
  assert e % k == 0, (e, k)
  params = decoder.prepare(params)
  cache = decoder.empty_cache(e, lp + g.max_new)
  last = jnp.maximum(g.prompt_lens - 1, 0)[:, None]
  logits, cache = decoder.run(params, g.prompts, jnp.broadcast_to(jnp.arange(lp), (e, lp)),
                              cache, gather=last)
  first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
  table = g.stop_text
  nt = 0 if table is None else table.shape[0]

  def step(t, tok, pos, cache, out, state, done):
    """One token for rows [b]: record tok, match the stops, run the model."""
    b = tok.shape[0]
    tok = jnp.where(done, NO_TOKEN, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, ls - 1 + t))
    window = jax.lax.dynamic_slice(out, (0, t), (b, ls))  # [b, Ls]: the last ls outputs
    hit = jnp.all((window[:, None, :] == g.stop_ids[None]) | (g.stop_ids[None] == NO_TOKEN),
                  axis=-1) & jnp.any(g.stop_ids != NO_TOKEN, axis=-1)[None]
    done = done | jnp.any(hit, axis=-1)
    if nt:
      row = jnp.where(t == 0, 0, 1 + jnp.maximum(state, 0))  # [b, S']
      nxt_state = table[jnp.arange(nt)[None], row, jnp.maximum(tok, 0)[:, None]]
      state = jnp.where(done[:, None], state, nxt_state.astype(jnp.int32))
      done = done | jnp.any(state == HIT, axis=-1)
    logits, cache = decoder.run(params, jnp.maximum(tok, 0)[:, None], pos[:, None], cache)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return nxt, pos + 1, cache, out, state, done

  # Rows as [k, E/k]: per-group arrays; the model sees them flattened to [k * b]. The
  # cache's row axis is decoder.cache_axis.
  a = decoder.cache_axis
  grp = lambda x, axis=0: _split_rows(x, k, axis)
  flat = lambda x, axis=0: x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1],
                                     *x.shape[axis + 2:])
  rows = {"tok": grp(first), "pos": grp(g.prompt_lens.astype(jnp.int32)),
          "out": grp(jnp.full((e, ls - 1 + g.max_new), NO_TOKEN, jnp.int32)),
          "state": grp(jnp.zeros((e, nt), jnp.int32)), "done": grp(g.prompt_lens <= 0),
          "order": grp(jnp.tile(jnp.arange(e // k), k))}
  cache = jax.tree.map(lambda x: grp(x, a), cache)
  final = jnp.full((k, e // k, g.max_new), NO_TOKEN, jnp.int32)
  t = jnp.zeros((), jnp.int32)
  sizes = stage_sizes(e // k)
  for i, b in enumerate(sizes):
    nxt_b = sizes[i + 1] if i + 1 < len(sizes) else 0

    def cond(carry, nxt_b=nxt_b):
      t, rows, _ = carry
      busy = jnp.sum(~rows["done"], axis=-1)  # [k]
      return (t < g.max_new) & jnp.any(busy > nxt_b)

    def body(carry):
      t, rows, cache = carry
      f = {n: flat(x) for n, x in rows.items()}
      tok, pos, c, out, state, done = step(
          t, f["tok"], f["pos"], jax.tree.map(lambda x: flat(x, a), cache), f["out"],
          f["state"], f["done"])
      new = dict(f, tok=tok, pos=pos, out=out, state=state, done=done)
      return t + 1, {n: grp(x) for n, x in new.items()}, jax.tree.map(lambda x: grp(x, a), c)

    t, rows, cache = jax.lax.while_loop(cond, body, (t, rows, cache))
    # Finished or not, every row's output so far goes to its place; then the unfinished
    # rows move to the front of their group and the next stage keeps nxt_b of them.
    put = jax.vmap(lambda fin, order, out: fin.at[order].set(out[:, ls - 1:]))
    final = put(final, rows["order"], rows["out"])
    if nxt_b:
      perm = jnp.argsort(rows["done"], axis=-1, stable=True)[:, :nxt_b]  # [k, nxt_b]
      take = lambda x, axis=0: jax.vmap(lambda y, p: jnp.take(y, p, axis=axis),
                                        in_axes=(axis, 0), out_axes=axis)(x, perm)
      rows = {n: take(x) for n, x in rows.items()}
      cache = jax.tree.map(lambda x: take(x, a), cache)
  return final.reshape(e, g.max_new)


def _split_rows(x: jax.Array, k: int, axis: int = 0) -> jax.Array:
  """Rows [..., k * b, ...] at `axis` -> [..., k, b, ...]."""
  return x.reshape(*x.shape[:axis], k, x.shape[axis] // k, *x.shape[axis + 1:])


def texts(vocabulary, tokens: np.ndarray) -> list[str]:
  """Decoded continuations [E, T] -> text, each up to its first EOS (NO_TOKEN dropped)."""
  out, eos = [], vocabulary.eos_id
  for row in np.asarray(tokens).tolist():
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    out.append(vocabulary.decode([t for t in row if t >= 0]))
  return out
