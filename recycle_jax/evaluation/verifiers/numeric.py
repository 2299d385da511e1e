"""Numeric answers scored as lm-eval's gsm8k task scores them (item for item).

Two filters, each a regex then take_first, then exact_match with the gsm8k task's options:
  strict-match      `#### (\\-?[0-9\\.\\,]+)`: the first number after the first "#### ".
  flexible-extract  `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match (group_select -1).
A response the regex does not match becomes "[invalid]" (lm-eval's fallback). exact_match
then removes the regexes `,`, `\\$`, `(?s).*#### `, `\\.$` from the filtered response and
from the target (in that order), lowercases both (ignore_case) and compares the strings:
"72" matches "#### 72" and "72." but not "72.0" or "$ 72".
"""
from __future__ import annotations

import re
from typing import Sequence

from recycle_jax.evaluation.verifiers import text

FALLBACK = "[invalid]"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# the gsm8k task's exact_match options
MATCH = text.MatchOptions(ignore_case=True, ignore_punctuation=False,
                          regexes_to_ignore=(",", r"\$", "(?s).*#### ", r"\.$"))


def regex_filter(response: str, pattern: re.Pattern, group_select: int = 0) -> str:
  """lm-eval's RegexFilter then take_first on one response."""
  found = pattern.findall(response if isinstance(response, str) else "")
  if not found:
    return FALLBACK
  match = found[group_select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), FALLBACK)
  return match.strip()


def strict_match(response: str) -> str:
  return regex_filter(response, STRICT)


def flexible_extract(response: str) -> str:
  return regex_filter(response, FLEXIBLE, -1)


def numeric_hits(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Per-example hits under both filters (lm-eval's metric names)."""
  refs = [str(t) for t in targets]
  return {"strict-match": [float(text.matches(strict_match(p), r, MATCH))
                           for p, r in zip(predictions, refs)],
          "flexible-extract": [float(text.matches(flexible_extract(p), r, MATCH))
                               for p, r in zip(predictions, refs)]}
