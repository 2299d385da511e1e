"""Verifiers: programs that score generations, as a registry (big_vision's evaluators).

Each entry is a seqio `metric_fns`-compatible function `metric(targets, predictions) ->
{name: value}` (percentages), built from the family's per-example `hits`, whose first key
is the one the search uses as the task's score (`Verifier.primary`). One file per family:

  text      exact_match (normalized), regex_match
  numeric   numeric (GSM8K answer extraction)
  code      code_tests (MBPP/HumanEval unit tests), code_output, output_prediction
  ifeval    ifeval (verifiable instructions, prompt/instruction level, strict/loose)

Adding a verifier is one `Verifier` entry in REGISTRY; tests/test_verifiers.py runs every
entry on right and wrong answers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from recycle_jax.runtime.errors import UserError
from recycle_jax.evaluation.verifiers import code, ifeval, numeric, text
from recycle_jax.runtime.registry import Registry

Hits = Callable[[Sequence, Sequence[str]], dict]


def _mean_percent(hits: dict) -> dict:
  return {k: 100.0 * float(np.mean(v)) if len(v) else 0.0 for k, v in hits.items()}


@dataclasses.dataclass(frozen=True)
class Verifier:
  """name: the registry key. hits(targets, predictions) -> {metric: [values in [0, 1]]},
  one per example (the first metric, the task's score: `primary`) or per unit of the
  metric (IFEval's instruction-level lists hold one value per instruction)."""
  name: str
  hits: Hits
  description: str

  def __call__(self, targets: Sequence, predictions: Sequence[str]) -> dict:
    """The seqio metric: every metric of `hits` as a percentage over the examples."""
    return _mean_percent(self.hits(targets, predictions))

  @property
  def __name__(self) -> str:  # seqio names metric functions by __name__
    return self.name

  def primary(self, targets: Sequence, predictions: Sequence[str]) -> np.ndarray:
    """[E] per-example values of the first metric (what the search scores)."""
    return np.asarray(next(iter(self.hits(targets, predictions).values())), np.float32)


REGISTRY: Registry[Verifier] = Registry("verifier")
for _v in (
    Verifier("exact_match", text.exact_match_hits, "normalized exact match (SQuAD)"),
    Verifier("regex_match", text.regex_match_hits, "the target regex matches the output"),
    Verifier("numeric", numeric.numeric_hits, "GSM8K numeric answer extraction"),
    Verifier("code_tests", code.code_tests_hits, "program + unit tests pass (pass@1)"),
    Verifier("code_output", code.code_output_hits, "the generated program prints the target"),
    Verifier("output_prediction", code.output_prediction_hits,
             "the task's program prints the generation"),
    Verifier("ifeval", ifeval.ifeval_hits, "IFEval verifiable instructions"),
):
  REGISTRY.register(_v)
get = REGISTRY.get


