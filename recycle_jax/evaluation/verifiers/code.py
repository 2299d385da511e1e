"""Code verifiers: programs executed in the sandbox (`sandbox.py`), pass@1 of one sample.

  code_tests         MBPP/HumanEval: the program prefix + prediction runs in the sandbox;
                     the tests run in the sandbox's harness, out of the program's reach,
                     calling its functions with plain values (the prefix, the task's
                     prompt, runs there too: the tests use its helpers, not the
                     program's). The sample passes when every assert holds.
                     target: {"prefix": str (optional), "tests": str} or the tests alone.
  code_output        the generated program's stdout equals the expected output.
                     target: {"prefix": str (optional), "stdout": str} or the output alone.
  output_prediction  CRUXEval-O style: the task's program is executed and its stdout must
                     equal the prediction (the model predicts what the code prints).
                     target: {"program": str} or the program alone.
Outputs are compared with surrounding whitespace stripped. Outcomes are cached by program
(text, tests, prefix) within a process (a search scores the same programs for many candidates; the cache
also makes a program's verdict the same every time it is asked).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from recycle_jax.evaluation.verifiers import sandbox

LIMITS = sandbox.Limits()
_CACHE: dict[bytes, sandbox.Outcome] = {}
_CACHE_MAX = 200_000


def run_cached(programs: Sequence[sandbox.Program | str], limits: sandbox.Limits = LIMITS,
               workers: int | None = None) -> list[sandbox.Outcome]:
  """Outcomes of `programs`; programs already run in this process are not run again."""
  programs = [sandbox.Program(p) if isinstance(p, str) else p for p in programs]
  keys = [hashlib.sha256(repr((limits, p)).encode()).digest() for p in programs]
  todo = {k: p for k, p in zip(keys, programs) if k not in _CACHE}
  if len(_CACHE) + len(todo) > _CACHE_MAX:
    _CACHE.clear()
  for k, outcome in zip(todo, sandbox.run_programs(list(todo.values()), limits, workers)):
    _CACHE[k] = outcome
  return [_CACHE[k] for k in keys]


def _field(target, key: str, default: str = "") -> str:
  return target.get(key, default) if isinstance(target, dict) else default


def code_tests_hits(targets: Sequence, predictions: Sequence[str]) -> dict:
  programs = [sandbox.Program(f"{_field(t, 'prefix')}{p}\n", _field(t, "tests", t),
                             _field(t, "prefix")) for t, p in zip(targets, predictions)]
  return {"pass@1": [float(o.passed) for o in run_cached(programs)]}


def code_output_hits(targets: Sequence, predictions: Sequence[str]) -> dict:
  outcomes = run_cached([f"{_field(t, 'prefix')}{p}\n" for t, p in zip(targets, predictions)])
  return {"output_match": [float(o.passed and o.stdout.strip() == _field(t, "stdout", t).strip())
                           for t, o in zip(targets, outcomes)]}


def output_prediction_hits(targets: Sequence, predictions: Sequence[str]) -> dict:
  outcomes = run_cached([_field(t, "program", t) for t in targets])
  return {"output_match": [float(o.passed and o.stdout.strip() == p.strip())
                           for p, o in zip(predictions, outcomes)]}
