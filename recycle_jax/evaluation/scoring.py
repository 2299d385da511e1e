"""How each task is scored: its kind and, for generation, how far and until what to decode.

A task's `Scoring` is declared when it is registered (`declare`); a seqio Task registered
elsewhere gets one inferred from what it declares (`of`): examples with `choices` are
`choice`, a task with `metric_fns` is `generate` (its metrics are its verifiers; the first
value of the first metric is its score), any other task is `exact`. The kinds themselves
and their scorers are `kinds.REGISTRY`.

Each task states which metric is its score (`Scoring.metric`), under lm-eval's names:
  choice    acc (summed log-likelihood of each choice, lm-eval's `acc`; the default),
            acc_norm (per character of the choice), acc_bytes (per UTF-8 byte),
            acc_mean_token (per token: no lm-eval metric, named so).
  exact     is_greedy (lm-eval's loglikelihood `acc`: the continuation is the greedy
            one; the default), is_greedy_eos (the continuation followed by EOS).
  generate  one of the verifier's metrics (default its first).
Choice and exact continuations are tokenized as lm-eval does (`encode_pair`):
`target_delimiter` (lm-eval's, default " ") joins context and continuation, and the
context's trailing whitespace moves into the continuation.
"""
from __future__ import annotations

import dataclasses

from recycle_jax.runtime.errors import check


# The scoring kinds a task may declare; each is implemented by one entry of
# `kinds.REGISTRY` (tests/evaluation checks the two agree).
KIND_NAMES = ("choice", "exact", "generate")
# The metrics a device-scored kind can report (generate: its verifier's).
KIND_METRICS = {"choice": ("acc", "acc_norm", "acc_bytes", "acc_mean_token"),
                "exact": ("is_greedy", "is_greedy_eos")}


@dataclasses.dataclass(frozen=True)
class Scoring:
  """kind: 'choice' | 'exact' | 'generate'. For 'generate': decode greedily at most
  `max_new_tokens` tokens, stopping at EOS or at any of `stop` (the text is cut before
  it), then score the text with the task's metric_fns. splits: ((name used here, the
  task's own split name), ...) for a task whose splits are named otherwise, e.g.
  (('dev', 'validation'),): the search's 'dev' then reads the task's 'validation'.
  metric: the task's score (see the module docstring; "" = the kind's default).
  target_delimiter: put between context and continuation (choice, exact)."""
  kind: str
  max_new_tokens: int = 32
  stop: tuple[str, ...] = ()
  splits: tuple[tuple[str, str], ...] = ()
  metric: str = ""
  target_delimiter: str = " "

  def __post_init__(self):
    check(self.kind in KIND_NAMES, f"unknown scoring kind {self.kind!r}", "kind",
          f"choose from: {', '.join(KIND_NAMES)}")
    check(isinstance(self.max_new_tokens, int) and 0 < self.max_new_tokens <= 4096,
          f"max_new_tokens must be an integer in [1, 4096], got {self.max_new_tokens!r}",
          "max_new_tokens")
    check(all(isinstance(s, str) and s for s in self.stop),
          f"stop sequences must be non-empty strings, got {self.stop!r}", "stop")
    check(isinstance(self.target_delimiter, str),
          f"target_delimiter must be a string, got {self.target_delimiter!r}",
          "target_delimiter")
    if self.kind in KIND_METRICS:
      check(not self.metric or self.metric in KIND_METRICS[self.kind],
            f"kind {self.kind!r} has no metric {self.metric!r}", "metric",
            f"choose from: {', '.join(KIND_METRICS[self.kind])}")

  @property
  def score_metric(self) -> str:
    """The metric the task is scored by ("" for generate: its verifier's first)."""
    return self.metric or KIND_METRICS.get(self.kind, ("",))[0]


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's `_encode_pair` (causal models): the context's trailing whitespace moved to
  the continuation, context + continuation encoded together and split at the length of
  the context's own encoding. encode: text -> ids (no special tokens)."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole, head = encode(context + continuation), encode(context)
  return list(head), list(whole[len(head):])


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
  values = task.metric_fns[0](targets, preds)
  metric = of(task, False).metric
  return float(values[metric] if metric else next(iter(values.values())))
