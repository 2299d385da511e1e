"""How each task is scored: its kind and, for generation, how far and until what to decode.

A task's `Scoring` is declared when it is registered (`declare`); a seqio Task registered
elsewhere gets one inferred from what it declares (`of`): examples with `choices` are
`choice`, a task with `metric_fns` is `generate` (its metrics are its verifiers; the first
value of the first metric is its score), any other task is `exact`. The kinds themselves
and their scorers are `kinds.REGISTRY`.
"""
from __future__ import annotations

import dataclasses

from recycle_jax.runtime.errors import check


# The scoring kinds a task may declare; each is implemented by one entry of
# `kinds.REGISTRY` (tests/evaluation checks the two agree).
KIND_NAMES = ("choice", "exact", "generate")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """kind: 'choice' | 'exact' | 'generate'. For 'generate': decode greedily at most
  `max_new_tokens` tokens, stopping at EOS or at any of `stop` (the text is cut before
  it), then score the text with the task's metric_fns. splits: ((name used here, the
  task's own split name), ...) for a task whose splits are named otherwise, e.g.
  (('dev', 'validation'),): the search's 'dev' then reads the task's 'validation'."""
  kind: str
  max_new_tokens: int = 32
  stop: tuple[str, ...] = ()
  splits: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    check(self.kind in KIND_NAMES, f"unknown scoring kind {self.kind!r}", "kind",
          f"choose from: {', '.join(KIND_NAMES)}")
    check(isinstance(self.max_new_tokens, int) and 0 < self.max_new_tokens <= 4096,
          f"max_new_tokens must be an integer in [1, 4096], got {self.max_new_tokens!r}",
          "max_new_tokens")
    check(all(isinstance(s, str) and s for s in self.stop),
          f"stop sequences must be non-empty strings, got {self.stop!r}", "stop")


_DECLARED: dict[str, Scoring] = {}


def declare(task: str, scoring: Scoring) -> None:
  _DECLARED[task] = scoring


def of(task, has_choices: bool) -> Scoring:
  """The Scoring of a seqio Task whose examples have `choices` or not (declared, else
  inferred; see the module docstring)."""
  if task.name in _DECLARED:
    return _DECLARED[task.name]
  return Scoring("choice" if has_choices else "generate" if task.metric_fns else "exact")


def split_name(task: str, split: str) -> str:
  """The task's own name for `split` ('dev', 'test', ...), as its Scoring maps it."""
  declared = _DECLARED.get(task)
  return dict(declared.splits).get(split, split) if declared else split


def truncate(text: str, stop: tuple[str, ...]) -> str:
  """`text` cut before the first stop sequence it contains."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
  return text[:cut]


def score_texts(task, examples, texts) -> float:
  """A 'generate' task's score (0-100) of decoded continuations `texts`, one per example
  (seqio dicts with `targets_pretokenized`): cut at the stop sequences, postprocessed as
  the task says (seqio's postprocess_fn contract), scored by its first metric's first
  value. The search, `eval` and the tests all score generations through this."""
  stop = of(task, False).stop
  post = task.postprocess_fn or (lambda x, example=None, is_target=False: x)
  as_text = lambda b: b.decode() if isinstance(b, bytes) else b
  targets = [post(as_text(e["targets_pretokenized"]), example=e, is_target=True)
             for e in examples]
  preds = [post(truncate(t, stop), example=e, is_target=False) for t, e in zip(texts, examples)]
  check(bool(task.metric_fns), f"task {task.name!r} generates but has no metric_fns",
        task.name, "register it with a verifier")
  return float(next(iter(task.metric_fns[0](targets, preds).values())))
