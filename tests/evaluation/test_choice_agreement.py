"""A multiple-choice task in lm-eval's style ("Answer:" then " " + choice) scored item for
item as lm-eval scores it with its `hf` model: the reference encodes each request with
lm-eval's own `_encode_pair` (BOS added by the tokenizer, as HFLM's tok_encode does),
sums the continuation's log-probabilities with transformers' LlamaForCausalLM, and ranks
with lm-eval's process_results formulas (acc: argmax of the sums, acc_norm: of the sums
over the choices' characters, acc_bytes: over their UTF-8 bytes). recycle_jax reads the
same Hugging Face folder and scores the JSONL task on device."""
import json

import jax
import numpy as np
import pytest

from recycle_jax.checkpoint_io import checkpoints, tokenizer_files
from recycle_jax.evaluation import kinds, scorers, task_splits, vocabularies
from recycle_jax.models import transformer
from recycle_jax.tasks import jsonl
from recycle_jax.tasks.jsonl import JsonlTask
from tests import hf_fixtures
from tests.evaluation.test_lm_eval_tokenization import _lm_eval_pair

WORDS = ["cat", "dog", "the bone", "mat", "Ann", "Bob is taller", "fox", "owl", "1 2 3",
         "tea", "print ( x )", "who"]


def _rows(n=24, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    choices = [str(w) for w in rng.choice(WORDS, 5, replace=False)]
    out.append({"q": f"the {WORDS[i % len(WORDS)]} sat on the", "c": choices,
                "y": int(rng.integers(5))})
  return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf")
  fast = hf_fixtures.train_bpe(str(folder))
  hf_fixtures.tiny_llama(str(folder), len(fast), seed=3)
  return str(folder)


def _reference(folder, rows):
  """[E, 5] summed log-probs of each choice, lm-eval's requests through transformers."""
  import torch
  from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast.from_pretrained(folder)
  model = LlamaForCausalLM.from_pretrained(folder).eval()
  with_bos = type("Bos", (), {"encode": lambda self, s, **_: fast.encode(s)})()
  out = []
  for r in rows:
    context = f"Question: {r['q']}\nAnswer:"
    lls = []
    for c in r["c"]:
      ctx, cont = _lm_eval_pair(with_bos, context, " " + c)
      ids = torch.tensor([ctx + cont])
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
      lls.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
    out.append(lls)
  return np.array(out)


@pytest.mark.slow  # about 40-100 s each on the shared 2-core machine (transformers reference)
@pytest.mark.parametrize("metric", ["acc", "acc_norm", "acc_bytes"])
def test_choice_scores_agree_with_lm_eval_item_for_item(model_folder, tmp_path, metric):
  pytest.importorskip("lm_eval")
  rows = _rows()
  path = tmp_path / "dev.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  name = jsonl.register(JsonlTask(name=f"lm_style_{metric}", splits={"dev": str(path)},
                                  prompt="Question: {q}\nAnswer:", kind="choice",
                                  choices="c", label="y", metric=metric))
  meta = checkpoints.read_metadata(model_folder)
  cfg = transformer.ModelConfig(**meta.model_config)
  vocab = vocabularies.for_evaluation(tokenizer_files.of_checkpoint(model_folder, meta.custom),
                                      cfg.vocab_size, model_folder)
  d = task_splits.materialize(name, "dev", None, vocab)
  params = checkpoints.restore(model_folder, meta.abstract)
  dec = transformer.Decoder(cfg)
  ours = np.asarray(kinds.rank_classification(dec.apply, params, d.replace(packed=None)))
  packed = float(scorers.evaluate(jax.jit(scorers.make_scorer(dec)), params, (d,))[0])
  lls = _reference(model_folder, rows)
  div = {"acc": np.ones_like(lls),
         "acc_norm": np.array([[len(c) for c in r["c"]] for r in rows], float),
         "acc_bytes": np.array([[len(c.encode()) for c in r["c"]] for r in rows], float)}
  theirs = (np.argmax(lls / div[metric], -1) == [r["y"] for r in rows]).astype(float)
  assert ours.tolist() == theirs.tolist()  # every item
  assert packed == pytest.approx(100 * theirs.mean())
  assert 0 < theirs.sum() < len(rows)
