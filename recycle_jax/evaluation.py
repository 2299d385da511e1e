"""Task splits materialized once into fixed-shape arrays, and jitted scorers.

A split becomes a `TaskData` pytree (static `kind`, fixed shapes), so one compiled
program can score any candidate, or a vmapped population, without leaving the device.

  generate: greedy decoding checked by exact match against the target (+EOS). Because
            decoding is greedy, "every teacher-forced argmax equals the target" is the
            same event; `generation='teacher_forced'` scores it with one forward pass.
  choice:   rank classification by length-normalized log-likelihood of each choice.
Scores are percentages in [0, 100].
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from recycle_jax import models
from recycle_jax.errors import UserError, check

PyTree = Any


@flax.struct.dataclass
class TaskData:
  """One task split. E examples, C choices, L sequence length.

  generate: tokens [E, L] = prompt + target + EOS (right-padded), target_mask [E, L]
            marks target tokens; prompts [E, Lp], prompt_lens [E]; targets [E, Lt],
            target_lens [E] (EOS included).
  choice:   tokens [E, C, L], target_mask [E, C, L], labels [E].
  """
  tokens: jax.Array
  target_mask: jax.Array
  labels: jax.Array | None = None
  prompts: jax.Array | None = None
  prompt_lens: jax.Array | None = None
  targets: jax.Array | None = None
  target_lens: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default="generate")
  name: str = flax.struct.field(pytree_node=False, default="")

  @property
  def num_examples(self) -> int:
    return self.tokens.shape[0]


def _round_up(n: int, m: int = 8) -> int:
  return max(m, -(-n // m) * m)


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _sequences(prompts, conts) -> tuple[np.ndarray, np.ndarray]:
  seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
  length = _round_up(max(map(len, seqs)))
  mask = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, conts)]
  return _pad(seqs, length), _pad(mask, length).astype(bool)


def get_task(name: str) -> seqio.Task:
  from recycle_jax import tasks as _  # registers the embedded benchmark
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = ", ".join(sorted(seqio.TaskRegistry.names()))
    raise UserError(f"unknown task {name!r}", "--tasks / search.tasks",
                    f"choose from: {known}") from None


def split_examples(name: str, split: str) -> list[dict]:
  """Tokenized examples (seqio preprocessing) as numpy dicts."""
  task = get_task(name)
  check(split in task.splits, f"task {name!r} has no split {split!r}", "--split",
        f"choose from: {', '.join(task.splits)}")
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  return list(ds.as_numpy_iterator())


@functools.lru_cache(None)
def materialize(name: str, split: str, max_examples: int | None = None) -> TaskData:
  """Reads a seqio task split once and pads it into fixed-shape arrays."""
  rows = split_examples(name, split)[:max_examples]
  check(len(rows) > 0, f"task {name!r} split {split!r} is empty", "--split")
  prompts = [r["inputs"].tolist() for r in rows]
  if "choices" in rows[0]:
    choices = [[models.VOCAB.encode(c.decode()) for c in r["choices"]] for r in rows]
    num_choices = len(choices[0])
    flat_p = [p for p, cs in zip(prompts, choices) for _ in cs]
    tokens, mask = _sequences(flat_p, [c for cs in choices for c in cs])
    e = len(rows)
    return TaskData(tokens=tokens.reshape(e, num_choices, -1),
                    target_mask=mask.reshape(e, num_choices, -1),
                    labels=np.array([r["label"] for r in rows], np.int32),
                    kind="choice", name=name)
  targets = [r["targets"].tolist() for r in rows]  # EOS appended by seqio
  tokens, mask = _sequences(prompts, targets)
  return TaskData(tokens=tokens, target_mask=mask, kind="generate", name=name,
                  prompts=_pad(prompts, _round_up(max(map(len, prompts)))),
                  prompt_lens=np.array([len(p) for p in prompts], np.int32),
                  targets=_pad(targets, max(map(len, targets))),
                  target_lens=np.array([len(t) for t in targets], np.int32))


def load_split(task_names: Sequence[str], split: str,
               max_examples: int | None = None) -> tuple[TaskData, ...]:
  return tuple(materialize(t, split, max_examples) for t in task_names)


# ----------------------------------------------------------------------------- scorers

def teacher_forced_exact_match(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where every target token is the argmax given the true prefix."""
  pred = jnp.argmax(apply(params, d.tokens)[:, :-1], axis=-1)
  ok = (pred == d.tokens[:, 1:]) | ~d.target_mask[:, 1:]
  return jnp.all(ok, axis=-1).astype(jnp.float32)


def greedy_exact_match(decode, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where greedy decoding reproduces target + EOS."""
  out = decode(params, d.prompts, d.prompt_lens, d.targets.shape[1])
  valid = jnp.arange(d.targets.shape[1])[None] < d.target_lens[:, None]
  return jnp.all((out == d.targets) | ~valid, axis=-1).astype(jnp.float32)


def choice_logprobs(apply, params, d: TaskData) -> jax.Array:
  """[E, C] length-normalized log-likelihood of each choice."""
  e, c, l = d.tokens.shape
  toks, mask = d.tokens.reshape(e * c, l), d.target_mask.reshape(e * c, l)
  lp = models.token_logprobs(apply(params, toks), toks)
  score = jnp.sum(lp * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1)
  return score.reshape(e, c)


def rank_classification(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where the labelled choice has the highest normalized log-likelihood."""
  return (jnp.argmax(choice_logprobs(apply, params, d), -1) == d.labels).astype(jnp.float32)


@gin.configurable
@functools.lru_cache(None)
def make_scorer(decoder: models.Decoder, generation: str = "teacher_forced",
                batch_size: int = 0) -> Callable[[PyTree, tuple[TaskData, ...]], jax.Array]:
  """`score(params, datas) -> [T]` percentages, pure and jittable.

  generation: 'teacher_forced' (one forward; same result as greedy), 'greedy' (KV-cache
  decoding) or 'greedy_uncached' (any apply fn). batch_size > 0 evaluates examples in
  chunks with lax.map to bound activation memory.
  """
  apply = decoder.apply
  check(generation in ("teacher_forced", "greedy", "greedy_uncached"),
        f"unknown generation scoring {generation!r}", "make_scorer.generation",
        "use teacher_forced, greedy or greedy_uncached")
  decode = (decoder.greedy_decode if generation == "greedy" else
            functools.partial(models.greedy_decode_uncached, apply))

  def per_example(params, d: TaskData) -> jax.Array:
    if d.kind == "choice":
      return rank_classification(apply, params, d)
    if generation == "teacher_forced":
      return teacher_forced_exact_match(apply, params, d)
    return greedy_exact_match(decode, params, d)

  def one_task(params, d: TaskData) -> jax.Array:
    e = d.num_examples
    if batch_size <= 0 or e <= batch_size:
      return 100.0 * jnp.mean(per_example(params, d))
    n = -(-e // batch_size) * batch_size
    padded = jax.tree.map(lambda x: jnp.pad(x, [(0, n - e)] + [(0, 0)] * (x.ndim - 1)), d)
    chunks = jax.tree.map(lambda x: x.reshape(n // batch_size, batch_size, *x.shape[1:]),
                          padded)
    hits = jax.lax.map(lambda c: per_example(params, c), chunks).reshape(n)[:e]
    return 100.0 * jnp.mean(hits)

  def score(params, datas: tuple[TaskData, ...]) -> jax.Array:
    return jnp.stack([one_task(params, d) for d in datas])

  return score


def decode_text(tokens: np.ndarray) -> str:
  """Token ids up to the first EOS as text."""
  ids = list(np.asarray(tokens))
  if models.EOS_ID in ids:
    ids = ids[:ids.index(models.EOS_ID)]
  return models.VOCAB.decode([i for i in ids if i > models.EOS_ID])
