"""Text verifiers: exact match as lm-eval computes it, SQuAD's normalized match, regex.

  exact_match        lm-eval's `exact_match` (its hf-evaluate metric): each regex of
                     `regexes_to_ignore` removed (re.sub, in order) from prediction and
                     target, then lowercased if `ignore_case`, then string.punctuation
                     removed if `ignore_punctuation`, then the strings compared. With no
                     option (lm-eval's default) "The lion" and "Lion" differ.
  exact_match_squad  SQuAD's answer normalization on both (lowercase, punctuation and the
                     articles a/an/the removed, whitespace collapsed): "The Fox." = "fox".
  regex_match        the target, a regular expression, matches the whole stripped output.
A target may be a list of acceptable answers (any one matches).
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Sequence

from recycle_jax.runtime.errors import UserError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclasses.dataclass(frozen=True)
class MatchOptions:
  """lm-eval's exact_match options (its defaults: all off)."""
  ignore_case: bool = False
  ignore_punctuation: bool = False
  regexes_to_ignore: tuple[str, ...] = ()

  def __post_init__(self):
    for r in self.regexes_to_ignore:
      try:
        re.compile(r)
      except re.error as e:
        raise UserError(f"invalid regular expression {r!r} in regexes_to_ignore: {e}",
                        "the exact_match verifier's options",
                        "fix the pattern (Python `re` syntax)") from None

  def apply(self, s: str) -> str:
    for r in self.regexes_to_ignore:
      s = re.sub(r, "", s)
    if self.ignore_case:
      s = s.lower()
    if self.ignore_punctuation:
      s = s.translate(_PUNCT)
    return s


def matches(prediction: str, target: str, options: MatchOptions = MatchOptions()) -> bool:
  return options.apply(prediction) == options.apply(target)


def _refs(t) -> list[str]:
  return [str(r) for r in (t if isinstance(t, (list, tuple)) else [t])]


def exact_match_hits(targets: Sequence, predictions: Sequence[str], *,
                     ignore_case: bool = False, ignore_punctuation: bool = False,
                     regexes_to_ignore: Sequence[str] = ()) -> dict:
  """Per-example hits of lm-eval's exact_match with its options."""
  o = MatchOptions(bool(ignore_case), bool(ignore_punctuation), tuple(regexes_to_ignore))
  return {"exact_match": [float(any(matches(p, r, o) for r in _refs(t)))
                          for t, p in zip(targets, predictions)]}


def squad_normalize(text: str) -> str:
  text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
  return " ".join(text.split())


def exact_match_squad_hits(targets: Sequence, predictions: Sequence[str]) -> dict:
  """Per-example hits: equal after SQuAD's normalization (`squad_normalize`)."""
  return {"exact_match_squad": [
      float(any(squad_normalize(r) == squad_normalize(p) for r in _refs(t)))
      for t, p in zip(targets, predictions)]}


def regex_match_hits(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Per-example hits: the target, a regular expression, matches the whole prediction
  (stripped). An invalid expression is refused, naming it."""
  hits = []
  for t, p in zip(targets, predictions):
    try:
      pattern = re.compile(t, re.DOTALL)
    except re.error as e:
      raise UserError(f"invalid regular expression {t!r} in a target: {e}",
                      "the task's targets", "fix the pattern (Python `re` syntax)") from None
    hits.append(float(pattern.fullmatch(p.strip()) is not None))
  return {"regex_match": hits}
