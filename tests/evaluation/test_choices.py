"""Choice tasks with any number of choices per example, varying between examples: padded
choice slots never win, and a split scores as its examples scored one at a time."""
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from recycle_jax.evaluation import task_data
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.evaluation import kinds
from recycle_jax.models import transformer

CFG = transformer.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus")


def _rows(counts, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(counts):
    choices = [str(c) for c in rng.choice(NAMES, n, replace=False)]
    out.append({"inputs": f"Q{i}: who is {choices[0][::-1]}? ", "targets": choices[0],
                "choices": choices, "label": int(rng.integers(n))})
  return out


def _register(name, rows):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  def fn(split, shuffle_files=False, seed=None):
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [r["inputs"] for r in rows], "targets": [r["targets"] for r in rows],
        "choices": tf.ragged.constant([r["choices"] for r in rows]),
        "label": [r["label"] for r in rows]})
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(fn, splits=("dev",)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(transformer.VOCAB, add_eos=False),
                       "targets": seqio.Feature(transformer.VOCAB, add_eos=True)})


def _alone(d, i):
  """Example i of a choice split as a split of its own."""
  n = int(d.choice_count[i])
  prompt = d.tokens[i, 0][~d.target_mask[i, 0]][:int(np.argmax(d.target_mask[i, 0]))]
  choices = [list(d.tokens[i, c][d.target_mask[i, c]]) for c in range(n)]
  return task_data.choice_data("alone", [list(prompt)], [choices], [int(d.labels[i])])


@pytest.mark.slow  # ~12 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_mixed_choice_counts_score_as_each_example_alone():
  dec = transformer.Decoder(CFG)
  counts = (2, 3, 5, 2, 5, 3, 4, 2, 5, 3)
  _register("test_mixed_choices", _rows(counts))
  d = task_splits.materialize("test_mixed_choices", "dev")
  assert d.tokens.shape[:2] == (len(counts), 5)
  assert d.choice_count.tolist() == list(counts)
  score = jax.jit(scorers.make_scorer(dec))
  for seed in (0,):
    params = jax.tree.map(lambda x: 5.0 * x, transformer.init_params(CFG, jax.random.key(seed)))
    packed = float(score(params, (d,))[0])
    padded = np.asarray(kinds.rank_classification(dec.apply, params,
                                                       d.replace(packed=None)))
    alone = [float(kinds.rank_classification(dec.apply, params, _alone(d, i))[0])
             for i in range(len(counts))]
    assert padded.tolist() == alone
    assert round(packed * len(counts) / 100) == int(sum(alone))
    # The padded slots are -inf: never the argmax, whatever the real choices score.
    lp = np.asarray(kinds.choice_logprobs(dec.apply, params, d.replace(packed=None)))
    assert np.all(np.isneginf(lp[np.arange(5)[None] >= np.asarray(counts)[:, None]]))
    assert np.all(np.isfinite(lp[np.arange(5)[None] < np.asarray(counts)[:, None]]))


@pytest.mark.slow  # ~12 s: `make test-slow` (CI); keeps `make test` under 15 min
def test_uniform_counts_other_than_four():
  dec = transformer.Decoder(CFG)
  params = jax.tree.map(lambda x: 5.0 * x, transformer.init_params(CFG, jax.random.key(4)))
  for n in (2, 3, 5):
    _register(f"test_choices_{n}", _rows([n] * 4, seed=n))
    d = task_splits.materialize(f"test_choices_{n}", "dev")
    assert d.tokens.shape[1] == n
    hits = kinds.rank_classification(dec.apply, params, d.replace(packed=None))
    assert hits.shape == (4,)
    if n == 5:  # the packed layout agrees (every count: the mixed test above)
      s = float(scorers.make_scorer(dec)(params, (d,))[0])
      assert abs(s - 100 * float(np.mean(hits))) < 1e-4
