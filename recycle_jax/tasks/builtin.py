"""The tasks that ship with recycle_jax: the embedded benchmark (`rj_*`) and HumanEval.

Importing a task module registers nothing; the entry points (cli, experiment, pools, the
tests' conftest) call `register()` once before they read a task.
"""
from __future__ import annotations

from recycle_jax.tasks import embedded, harness, humaneval


def register(dev_size: int | None = None) -> tuple[str, ...]:
  """Registers every built-in task in seqio.TaskRegistry (idempotent); returns their names.
  dev_size: the embedded benchmark's dev items per task (None: 128)."""
  embedded.register(dev_size)
  humaneval.register()
  harness.register()  # lm-eval's tasks, named lm_eval:NAME
  return embedded.HELD_IN + embedded.HELD_OUT + (humaneval.NAME,)
