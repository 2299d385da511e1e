"""Numeric answers as GSM8K scorers extract them.

The answer of a text is the first number after its last `####` marker when it has one
(GSM8K's reference format and lm-eval's strict match), else the last number in it
(lm-eval's flexible extract). Numbers may carry a sign, thousands commas, a `$` and
decimals ("-1,234.50"); a trailing sentence period is not a decimal point. Answers are
compared as exact decimals, so "72", "72.0" and "$72.00" agree and "0.1 + 0.2" noise
cannot arise.
"""
from __future__ import annotations

import decimal
import re
from typing import Sequence

_NUMBER = re.compile(r"(?<![\w.])([-+]?)\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MARKER = "####"


def extract(text: str) -> decimal.Decimal | None:
  """The answer of `text` as a Decimal, or None when it holds no number."""
  if _MARKER in text:
    found = _NUMBER.search(text.rsplit(_MARKER, 1)[1])
  else:
    found = None
    for found in _NUMBER.finditer(text):
      pass
  if found is None:
    return None
  sign, digits = found.groups()
  try:
    return decimal.Decimal(sign.replace("+", "") + digits.replace(",", ""))
  except decimal.InvalidOperation:
    return None


def numeric_hits(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Per-example hits: the prediction's answer equals the target's (both extracted; a
  target may also be a bare number)."""
  hits = []
  for t, p in zip(targets, predictions):
    want, got = extract(str(t)), extract(p)
    hits.append(float(want is not None and got is not None and want == got))
  return {"accuracy": hits}
