"""Every scoring kind (kinds.REGISTRY), end to end on a JSONL task and a tiny model:
the score it gives is the one a reference computes, unchanged when the examples are split
over the mesh's 'data' axis, and the same through the population program."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascii_model import CFG, PROMPTS, ascii_model, own_texts
from recycle_jax.evaluation import kinds
from recycle_jax.evaluation import task_data
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.models import transformer, partitioning
from recycle_jax.search import population
from recycle_jax.tasks import jsonl
from recycle_jax.tasks.jsonl import JsonlTask


def _spoil(texts):
  """Every other text made wrong: 5 of 10 right."""
  return [t if i % 2 == 0 else t + " zq" for i, t in enumerate(texts)]


def _choice_case(tmp, dec, params):
  rows = [{"p": p + " ", "c": ["yes", "no", "maybe"][:2 + i % 2], "y": i % 2}
          for i, p in enumerate(PROMPTS)]
  d = task_data.TaskData  # reference: padded rank classification, no packing
  spec = dict(kind="choice", choices="c", label="y")
  return rows, spec, lambda data: 100 * float(jnp.mean(kinds.rank_classification(
      dec.apply, params, data.replace(packed=None))))


def _exact_case(tmp, dec, params):
  texts = _spoil(own_texts(dec, params))
  rows = [{"p": p, "a": t} for p, t in zip(PROMPTS, texts)]
  # reference: padded KV-cache greedy decoding, target + EOS reproduced (some are empty)
  spec = dict(kind="exact", target="{a}", target_delimiter="", metric="is_greedy_eos")
  return rows, spec, lambda data: 100 * float(jnp.mean(
      kinds.greedy_exact_match(dec.greedy_decode, params, data.replace(packed=None))))


def _generate_case(tmp, dec, params):
  texts = _spoil(own_texts(dec, params))
  rows = [{"p": p, "a": t} for p, t in zip(PROMPTS, texts)]
  return rows, dict(kind="generate", target="{a}", verifier="exact_match",
                    max_new_tokens=8), lambda data: 50.0


CASES = {"choice": _choice_case, "exact": _exact_case, "generate": _generate_case}


# Kinds of other task sources are tested with their source: lm_eval in
# tests/tasks/test_lm_eval_tasks.py (over the mesh and through the population program too).
SOURCE_KINDS = {"lm_eval"}


def test_every_kind_has_a_case():
  assert set(CASES) == set(kinds.REGISTRY) - SOURCE_KINDS


@pytest.mark.parametrize("kind", sorted(set(kinds.REGISTRY) - SOURCE_KINDS))
def test_kind_end_to_end(kind, tmp_path):
  dec, params = transformer.Decoder(CFG), ascii_model()
  rows, spec, reference = CASES[kind](tmp_path, dec, params)
  path = tmp_path / "dev.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  name = jsonl.register(JsonlTask(name=f"k_{kind}", splits={"dev": str(path)},
                                       prompt="{p}", **spec))
  data = task_splits.materialize(name, "dev", None, transformer.VOCAB)
  assert data.kind == kind and data.num_examples == len(PROMPTS)
  want = reference(data)
  assert 0 < want < 100
  # Examples split over the 8 devices of the 'data' axis (10 rows: padded to 16).
  mesh = partitioning.make_mesh()
  placed = task_data.place((data,), mesh)
  score = jax.jit(scorers.make_scorer(dec))
  got = scorers.evaluate(score, jax.device_put(params, partitioning.replicated(mesh)),
                            placed)
  assert got[0] == pytest.approx(want, abs=1e-4)
  # The population program: candidate 0 is the model, candidate 1 a zeroed one (scores
  # whatever it scores), candidate 2 overflows to inf: flagged non-finite.
  pool = (params, jax.tree.map(jnp.zeros_like, params))
  fn = jax.jit(population.make_population_fn(scorers.make_scorer(dec), "map"))
  alphas = np.array([[1, 0], [0, 1], [3e38, 0]], np.float32)
  scores, finite = population.pipelined(fn, alphas, pool, (data,), width=2)
  assert scores.shape == (3, 1) and finite.tolist() == [True, True, False]
  assert scores[0, 0] == pytest.approx(want, abs=1e-4)
