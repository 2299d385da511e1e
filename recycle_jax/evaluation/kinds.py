"""The scoring kinds: how a split of each kind is scored on device, one `Kind` record each
in `REGISTRY` (its materializer in `task_data`, its device function here).

  choice:   rank classification by the log-likelihood of each choice (any number of
            choices per example): summed (lm-eval's acc) or divided by the choice's
            characters, bytes or tokens (`scoring.KIND_METRICS`).
  exact:    the target is the greedy continuation (lm-eval's is_greedy; with EOS after it
            for the metric is_greedy_eos). Because decoding is greedy, "every
            teacher-forced argmax equals the target" is the same event;
            `generation='teacher_forced'` scores it with one forward pass.
  generate: greedy decoding on device (`decoding.generate`: KV cache, EOS and stop
            sequences); the tokens come back to the host, where the task's verifier
            (its seqio metric_fns, `scoring.score_texts`) scores them
            (`task_splits.verify`).
Choice and exact splits are tokenized as lm-eval tokenizes loglikelihood requests
(`scoring.encode_pair`). A task's kind is `scoring.of(task)`. Scores are percentages in
[0, 100].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp

from recycle_jax.models import decoding, transformer
from recycle_jax.evaluation import loglikelihood
from recycle_jax.evaluation.task_data import Packed, TaskData, _choice, _exact, _generate
from recycle_jax.runtime.registry import Registry

if TYPE_CHECKING:  # seqio imports TensorFlow: only reading a task does (get_task)
  pass

PyTree = Any


# ----------------------------------------------------------------------------- scorers

def teacher_forced_exact_match(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where every target token is the argmax given the true prefix."""
  pred = jnp.argmax(apply(params, d.tokens)[:, :-1], axis=-1)
  ok = (pred == d.tokens[:, 1:]) | ~d.target_mask[:, 1:]
  return jnp.all(ok, axis=-1).astype(jnp.float32)


def greedy_exact_match(decode, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where greedy decoding reproduces the target tokens."""
  out = decode(params, d.prompts, d.prompt_lens, d.targets.shape[1])
  valid = jnp.arange(d.targets.shape[1])[None] < d.target_lens[:, None]
  return jnp.all((out == d.targets) | ~valid, axis=-1).astype(jnp.float32)


def choice_logprobs(apply, params, d: TaskData) -> jax.Array:
  """[E, C] log-likelihood of each choice, summed and divided by `choice_norm`."""
  e, c, l = d.tokens.shape
  toks, mask = d.tokens.reshape(e * c, l), d.target_mask.reshape(e * c, l)
  lp = transformer.token_logprobs(apply(params, toks), toks)
  score = jnp.sum(lp * mask, -1).reshape(e, c)
  if d.choice_norm is not None:
    score = score / d.choice_norm
  if d.choice_count is None:
    return score
  return jnp.where(jnp.arange(c) < d.choice_count[:, None], score, -jnp.inf)


def rank_classification(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where the labelled choice has the highest (normalized) log-likelihood."""
  return (jnp.argmax(choice_logprobs(apply, params, d), -1) == d.labels).astype(jnp.float32)


def packed_hits(decoder: transformer.Decoder, params, p: Packed) -> jax.Array:
  """[R] hits of one packed bucket: is_greedy of the one continuation (num_groups == 1,
  the exact layout) or rank classification by (normalized) log-likelihood
  (`loglikelihood.packed_loglikelihood`; ties go to the first choice, as np.argmax)."""
  summed, is_greedy, count = loglikelihood.packed_loglikelihood(decoder, params, p)
  real = jnp.any(count > 0, axis=-1)  # rows with no scored slot are padding (`pad_rows`)
  if p.kind != "choice":
    return (is_greedy[:, 0] & real).astype(jnp.float32)
  score = jnp.where(count > 0, summed / p.group_norm, -jnp.inf)
  return ((jnp.argmax(score, -1) == p.labels) & real).astype(jnp.float32)


def _packed_or(ctx: "_Context", params, d: TaskData, padded: Callable) -> jax.Array:
  """Hits of a split: from its packed layout when it has one, else `padded` rows."""
  if d.packed:
    return jnp.concatenate([ctx.chunked(functools.partial(packed_hits, ctx.decoder), params,
                                        p, p.tokens.shape[0]) for p in d.packed])
  return ctx.chunked(padded, params, d.replace(packed=None), d.num_examples)


def _choice_hits(ctx: "_Context", params, d: TaskData) -> jax.Array:
  return _packed_or(ctx, params, d, functools.partial(rank_classification, ctx.decoder.apply))


def _exact_hits(ctx: "_Context", params, d: TaskData) -> jax.Array:
  if ctx.generation == "teacher_forced":
    return _packed_or(ctx, params, d,
                      functools.partial(teacher_forced_exact_match, ctx.decoder.apply))
  decode = (ctx.decoder.greedy_decode if ctx.generation == "greedy" else
            functools.partial(transformer.greedy_decode_uncached, ctx.decoder.apply))
  return ctx.chunked(functools.partial(greedy_exact_match, decode), params,
                     d.replace(packed=None), d.num_examples)


def _generate_tokens(ctx: "_Context", params, d: TaskData) -> jax.Array:
  return decoding.generate(ctx.decoder, params, decoding.Prompts(
      d.prompts, d.prompt_lens, d.stop_ids, d.max_new, d.stop_text, d.decode_groups))


@dataclasses.dataclass(frozen=True)
class Kind:
  """A scoring kind. materialize(name, prompts [E token lists], rows [E seqio examples],
  vocabulary, scoring) -> TaskData (host).
  device(ctx, params, d) -> hits [R] whose sum over the split's E examples is its score
  (`on_host` False), or tokens [E', max_new] that the host's verifier scores (`verify`)."""
  name: str
  materialize: Callable[..., TaskData]
  device: Callable[..., jax.Array]
  on_host: bool


REGISTRY: Registry[Kind] = Registry("scoring kind", "kind")
for _k in (
    Kind("choice", _choice, _choice_hits, on_host=False),
    Kind("exact", _exact, _exact_hits, on_host=False),
    Kind("generate", _generate, _generate_tokens, on_host=True),
):
  REGISTRY.register(_k)


def on_host(datas: Sequence[TaskData]) -> bool:
  """Whether some split's score is finished on the host (`finish`)."""
  return any(isinstance(d, TaskData) and REGISTRY[d.kind].on_host for d in datas)


@dataclasses.dataclass(frozen=True)
class _Context:
  decoder: transformer.Decoder
  generation: str
  batch_size: int

  def chunked(self, fn, params, tree, rows: int) -> jax.Array:
    """fn(params, tree) -> [rows] hits, in lax.map chunks of batch_size rows."""
    b = self.batch_size
    if b <= 0 or rows <= b:
      return fn(params, tree)
    n = -(-rows // b) * b
    padded = jax.tree.map(lambda x: jnp.pad(x, [(0, n - rows)] + [(0, 0)] * (x.ndim - 1)),
                          tree)
    chunks = jax.tree.map(lambda x: x.reshape(n // b, b, *x.shape[1:]), padded)
    return jax.lax.map(lambda c: fn(params, c), chunks).reshape(n)[:rows]
