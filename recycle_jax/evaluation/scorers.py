"""The jitted scorer (`make_scorer`: [T] percentages for a tuple of splits, pure and
vmappable over candidates) and the host's finishing step for splits scored by a verifier
(`finish`, `finish_async` on a verifier thread started on first use, `evaluate` for one
model). The kinds themselves: `kinds`.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.models import transformer
from recycle_jax.runtime.errors import check
from recycle_jax.evaluation import kinds
from recycle_jax.evaluation.kinds import _Context, on_host
from recycle_jax.evaluation.task_data import TaskData
from recycle_jax.evaluation.task_splits import verify

if TYPE_CHECKING:  # seqio imports TensorFlow: only reading a task does (get_task)
  pass

PyTree = Any


@functools.lru_cache(None)
def make_scorer(decoder: transformer.Decoder, generation: str = "teacher_forced",
                batch_size: int = 0) -> Callable:
  """`score(params, datas)`, pure and jittable: [T] percentages, or, when a split is
  scored on the host (`on_host`), ([T] with NaN at those splits, (tokens [E', max_new]
  of each such split, in order)), which `finish` completes.

  generation: how `exact` splits are scored: 'teacher_forced' (one forward; same result
  as greedy), 'greedy' (KV-cache decoding) or 'greedy_uncached' (any apply fn).
  batch_size > 0 evaluates examples in chunks with lax.map to bound activation memory.

  Splits from `materialize` carry a packed layout (`Packed`: length buckets, a choice
  task's prompt run once for all its choices, the head only where a prediction is
  scored); it gives the same hits as the padded scorers above, which are used for
  TaskData built without one and for greedy decoding.
  """
  check(generation in ("teacher_forced", "greedy", "greedy_uncached"),
        f"unknown generation scoring {generation!r}", "make_scorer.generation",
        "use teacher_forced, greedy or greedy_uncached")
  ctx = _Context(decoder, generation, batch_size)

  def score(params, datas: tuple[TaskData, ...]):
    scores, tokens = [], []
    for d in datas:
      out = kinds.REGISTRY[d.kind].device(ctx, params, d)
      if kinds.REGISTRY[d.kind].on_host:
        tokens.append(out)
        scores.append(jnp.float32(jnp.nan))
      else:
        scores.append(100.0 * jnp.sum(out) / d.num_examples)
    return (jnp.stack(scores), tuple(tokens)) if tokens else jnp.stack(scores)

  return score


@functools.lru_cache(None)
def _verifier_threads() -> concurrent.futures.ThreadPoolExecutor:
  """Started on first use (importing this module starts no thread)."""
  return concurrent.futures.ThreadPoolExecutor(2, "verify")


def finish(scores: np.ndarray, tokens: Sequence[np.ndarray],
           datas: Sequence[TaskData]) -> np.ndarray:
  """scores [K, T] with the host-scored splits' columns filled from their tokens
  (`make_scorer`'s outputs, with a leading candidate axis K)."""
  scores = np.array(scores, np.float32)
  cols = [i for i, d in enumerate(datas) if kinds.REGISTRY[d.kind].on_host]
  for i, t in zip(cols, tokens):
    scores[:, i] = verify(datas[i], t)
  return scores


def evaluate(score: Callable, params, datas: Sequence[TaskData]) -> np.ndarray:
  """[T] scores of one model: `score` (a jitted `make_scorer`) on device, then `finish`."""
  out = jax.device_get(score(params, tuple(datas)))
  if not on_host(datas):
    return np.asarray(out, np.float32)
  scores, tokens = out
  return finish(scores[None], [t[None] for t in tokens], datas)[0]


def finish_async(out, datas: Sequence[TaskData]) -> concurrent.futures.Future:
  """`finish` of a population program's device outputs (scores, finite, tokens) on a
  verifier thread: the caller dispatches the next program meanwhile. The future gives
  (scores [K, T], finite [K]) on the host."""
  def run():
    scores, finite, tokens = jax.device_get(out)
    return finish(scores, tokens, datas), finite
  return _verifier_threads().submit(run)
