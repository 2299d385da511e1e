"""A split whose sequences exceed the model's context is refused, never cut."""
import numpy as np
import pytest

from recycle_jax.evaluation import task_data
from recycle_jax.runtime.errors import UserError


def _exact(lengths, prompt=2):
  rows = [[5] * n for n in lengths]
  mask = [[0] * prompt + [1] * (n - prompt) for n in lengths]
  width = max(lengths)
  pad = lambda r: r + [0] * (width - len(r))
  return task_data.TaskData(tokens=np.array([pad(r) for r in rows]),
                            target_mask=np.array([pad(m) for m in mask], bool),
                            kind="exact", name="t", split="dev")


def test_longest_row_counts_prompt_and_continuation():
  assert task_data.longest_row(_exact([4, 9, 6])) == 9
  gen = task_data.TaskData(tokens=np.zeros((2, 8)), target_mask=np.zeros((2, 8), bool),
                           prompt_lens=np.array([3, 7]), kind="generate", max_new=5)
  assert task_data.longest_row(gen) == 12


def test_a_sequence_longer_than_the_context_is_refused_by_task():
  d = _exact([4, 9, 6])
  task_data.check_context([d], 9, "--tasks")  # fits exactly
  with pytest.raises(UserError, match=r"task 't' \(dev\) needs 9 tokens.*context of 8.*never cuts"):
    task_data.check_context([d], 8, "--tasks")
