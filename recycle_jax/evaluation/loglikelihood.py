"""lm-eval's loglikelihood request on device: the summed log-probability of each
continuation given its context, and whether it is the greedy continuation (is_greedy).

One function for every scorer that needs it (choice and exact kinds, lm-eval tasks), over
the packed layout (`task_data.Packed`): a row holds one context and its C continuations;
slot s of a row is the prediction of token slot_tok[s] of continuation slot_group[s].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recycle_jax.models import transformer


def packed_loglikelihood(decoder: transformer.Decoder, params, p) -> tuple[jax.Array, ...]:
  """(logprob [R, C], is_greedy [R, C], tokens [R, C]) of packed bucket `p`: each
  continuation's summed log-probability (float32), whether every one of its tokens is the
  argmax given the true prefix, and its token count (0 for an empty slot or pad row)."""
  # The head runs over the vocabulary in chunks: no [R, S, V] logits (`scored_tokens`).
  lp, top = decoder.score_packed(params, p.tokens, p.positions, p.segments, p.slot_pos,
                                 p.slot_tok)  # [R, S]
  greedy = top == p.slot_tok  # [R, S]
  member = p.slot_group[..., None] == jnp.arange(p.num_groups)  # [R, S, C]
  summed = jnp.einsum("rs,rsc->rc", lp, member.astype(lp.dtype))
  is_greedy = jnp.all(greedy[..., None] | ~member, axis=1)
  return summed, is_greedy, jnp.sum(member, axis=1)
