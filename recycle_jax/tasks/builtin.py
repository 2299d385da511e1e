"""The tasks that ship with recycle_jax: the embedded benchmark (`rj_*`) and HumanEval.

Importing a task module registers nothing; the entry points (cli, experiment, pools, the
tests' conftest) call `register()` once before they read a task.
"""
from __future__ import annotations

from recycle_jax.tasks import embedded, humaneval


def register() -> tuple[str, ...]:
  """Registers every built-in task in seqio.TaskRegistry (idempotent); returns their names."""
  embedded.register()
  humaneval.register()
  return embedded.HELD_IN + embedded.HELD_OUT + (humaneval.NAME,)
