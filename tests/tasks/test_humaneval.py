"""HumanEval through the path the search scores generations by: all 164 canonical solutions
pass; a corrupted copy fails (on a fixed quarter of the problems, every 4th of each split,
to keep the test near 30 s on 2 shared cores: each program is its own subprocess)."""
import time

from recycle_jax.evaluation import task_splits
from recycle_jax.tasks import humaneval
from recycle_jax.models import transformer
from recycle_jax.evaluation import scoring


def _decoded(text: str) -> str:
  """The text as the model's tokens would come back (vocabulary round trip)."""
  return transformer.VOCAB.decode(transformer.VOCAB.encode(text))


def test_canonical_solutions_pass_and_corrupted_ones_fail():
  task = task_splits.bound_task(humaneval.NAME, transformer.VOCAB)
  assert scoring.of(task, False).kind == "generate"
  examples = {s: task_splits.split_examples(humaneval.NAME, s, transformer.VOCAB)
              for s in ("dev", "test")}
  assert [len(v) for v in examples.values()] == [82, 82]
  start = time.time()
  for split, exs in examples.items():
    ps = humaneval.problems()[split == "test"::2]
    assert [e["inputs_pretokenized"].decode() for e in exs] == [p["prompt"] for p in ps]
    right = [_decoded(p["canonical_solution"]) for p in ps]
    # The same solutions one problem off: plausible programs that solve another problem,
    # each followed by text after a stop sequence (which the verifier path must cut).
    wrong = right[1:] + right[:1]
    assert scoring.score_texts(task, exs, [r + "\ndef junk(:" for r in right]) == 100.0
    assert scoring.score_texts(task, exs[::4], wrong[::4]) == 0.0
  assert time.time() - start < 120
