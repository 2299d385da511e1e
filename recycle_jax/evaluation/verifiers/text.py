"""Text verifiers: normalized exact match and regex match.

Targets and predictions are strings. `normalize` is SQuAD's answer normalization
(lowercase, punctuation and the articles a/an/the removed, whitespace collapsed), so
"The Fox." matches "fox".
"""
from __future__ import annotations

import re
import string
from typing import Sequence

from recycle_jax.runtime.errors import UserError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
  text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
  return " ".join(text.split())


def exact_match_hits(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Per-example hits: the prediction equals the target (or any of a list of targets)
  after `normalize`."""
  hits = []
  for t, p in zip(targets, predictions):
    refs = t if isinstance(t, (list, tuple)) else [t]
    hits.append(float(any(normalize(str(r)) == normalize(p) for r in refs)))
  return {"exact_match": hits}


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
