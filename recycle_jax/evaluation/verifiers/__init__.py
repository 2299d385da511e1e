"""Verifiers: programs that score generations, as a registry (big_vision's evaluators).

Each entry is a seqio `metric_fns`-compatible function `metric(targets, predictions) ->
{name: value}` (percentages), built from the family's per-example `hits`. A verifier names
its metrics (`metrics`); the first is the task's score unless the task names another
(`scoring.Scoring.metric`). One file per family, with the target each expects:

  text      exact_match        lm-eval's exact_match (options ignore_case,
                               ignore_punctuation, regexes_to_ignore); target: the answer
                               text, or a list of acceptable answers
            exact_match_squad  SQuAD-normalized match (articles and punctuation dropped)
            regex_match        target: a regular expression the whole output must match
  numeric   numeric            lm-eval gsm8k's strict-match and flexible-extract; target:
                               the answer ("72", or GSM8K's "... #### 72")
  code      code_tests         target: {"prefix": prompt, "tests": asserts} (HumanEval/MBPP)
            code_output        target: {"prefix": str, "stdout": expected output}
            output_prediction  target: {"program": the program whose output is predicted}
  ifeval    ifeval             target: an IFEval record {"instruction_id_list", "kwargs",
                               "prompt"}

Adding a verifier is one `Verifier` entry in REGISTRY; tests/evaluation/test_verifiers.py
runs every entry on right and wrong answers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import numpy as np

from recycle_jax.runtime.errors import check
from recycle_jax.evaluation.verifiers import code, ifeval, numeric, text
from recycle_jax.runtime.registry import Registry

Hits = Callable[..., dict]


def _mean_percent(hits: dict) -> dict:
  return {k: 100.0 * float(np.mean(v)) if len(v) else 0.0 for k, v in hits.items()}


@dataclasses.dataclass(frozen=True)
class Verifier:
  """name: the registry key. hits(targets, predictions, **options) -> {metric: [values in
  [0, 1]]}, one per example or per unit of the metric (IFEval's instruction-level lists
  hold one value per instruction). metrics: the names `hits` returns, the default score
  first. options: the keyword options `hits` accepts (`with_options`)."""
  name: str
  hits: Hits
  description: str
  metrics: tuple[str, ...]
  options: tuple[str, ...] = ()

  def __call__(self, targets: Sequence, predictions: Sequence[str]) -> dict:
    """The seqio metric: every metric of `hits` as a percentage over the examples."""
    return _mean_percent(self.hits(targets, predictions))

  @property
  def __name__(self) -> str:  # seqio names metric functions by __name__
    return self.name

  def per_item(self, targets: Sequence, predictions: Sequence[str],
               metric: str | None = None) -> np.ndarray:
    """[E] per-example values of `metric` (default the first: what the search scores)."""
    hits = self.hits(targets, predictions)
    return np.asarray(hits[metric or self.metrics[0]], np.float32)

  def primary(self, targets: Sequence, predictions: Sequence[str]) -> np.ndarray:
    return self.per_item(targets, predictions)

  def check_metric(self, metric: str | None, where: str) -> str:
    """`metric` (default the first) when this verifier reports it; else one error line."""
    metric = metric or self.metrics[0]
    check(metric in self.metrics, f"verifier {self.name!r} has no metric {metric!r}", where,
          f"choose from: {', '.join(self.metrics)}")
    return metric

  def with_options(self, options: Mapping | None, where: str = "verifier_options"
                   ) -> "Verifier":
    """This verifier with keyword options bound (lm-eval's metric kwargs, e.g.
    exact_match's ignore_case); an option it does not take is refused."""
    if not options:
      return self
    unknown = sorted(set(options) - set(self.options))
    check(not unknown, f"verifier {self.name!r} takes no option {', '.join(unknown)}", where,
          f"its options: {', '.join(self.options) or 'none'}")
    bound = functools.partial(self.hits, **dict(options))
    bound([], [])  # options are checked now (an invalid regex), not mid-search
    return dataclasses.replace(self, hits=bound)


REGISTRY: Registry[Verifier] = Registry("verifier")
for _v in (
    Verifier("exact_match", text.exact_match_hits, "lm-eval's exact_match", ("exact_match",),
             ("ignore_case", "ignore_punctuation", "regexes_to_ignore")),
    Verifier("exact_match_squad", text.exact_match_squad_hits,
             "SQuAD-normalized exact match (articles, punctuation, case ignored)",
             ("exact_match_squad",)),
    Verifier("regex_match", text.regex_match_hits, "the target regex matches the output",
             ("regex_match",)),
    Verifier("numeric", numeric.numeric_hits,
             "lm-eval gsm8k's strict-match and flexible-extract",
             ("strict-match", "flexible-extract")),
    Verifier("code_tests", code.code_tests_hits, "program + unit tests pass (pass@1)",
             ("pass@1",)),
    Verifier("code_output", code.code_output_hits, "the generated program prints the target",
             ("output_match",)),
    Verifier("output_prediction", code.output_prediction_hits,
             "the task's program prints the generation", ("output_match",)),
    Verifier("ifeval", ifeval.ifeval_hits, "IFEval verifiable instructions",
             ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
              "inst_level_loose_acc")),
):
  REGISTRY.register(_v)
get = REGISTRY.get
