"""Requests tokenized as lm-eval tokenizes them, on a real (locally trained) BPE tokenizer:
`encode_pair` is lm-eval's own `_encode_pair`, a choice split holds exactly lm-eval's
context and continuation ids, a tokenizer's stored truncation/padding is ignored as
transformers ignores it, and a chat template that is missing or raises is one error line."""
import json

import numpy as np
import pytest

from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.evaluation import scoring, task_splits, vocabularies
from recycle_jax.runtime.errors import UserError
from recycle_jax.tasks import jsonl
from recycle_jax.tasks.jsonl import JsonlTask
from tests import hf_fixtures

LONG = " ".join(["the cat sat on the mat . the dog ate the bone ."] * 30)
PAIRS = [("Answer:", " bike"), ("Answer: ", "bike"), ("Answer:  ", " bike"), ("Q\n", "A"),
         ("the cat sat", " on the mat"), ("who is oldest ?", " Ann"), ("x", "")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe")
  hf_fixtures.train_bpe(str(path))
  return str(path)


def _lm_eval_pair(fast, context, continuation):
  """lm-eval's TemplateLM._encode_pair (causal) with the tokenizer's ids, no specials."""
  from lm_eval.api.model import TemplateLM

  class Model(TemplateLM):
    backend = "causal"
    tok_encode = staticmethod(lambda s, **_: fast.encode(s, add_special_tokens=False))
    eot_token_id = 2
    loglikelihood_rolling = generate_until = _loglikelihood_tokens = None

  return Model.__new__(Model)._encode_pair(context, continuation)


def test_encode_pair_is_lm_evals(folder):
  pytest.importorskip("lm_eval")
  from transformers import PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast.from_pretrained(folder)
  encode = lambda s: fast.encode(s, add_special_tokens=False)  # noqa: E731
  for context, continuation in PAIRS:
    ours = scoring.encode_pair(encode, context, continuation)
    assert ours == tuple(map(list, _lm_eval_pair(fast, context, continuation)))
  # the trailing space is scored with the answer, never as a token of its own
  head, cont = scoring.encode_pair(encode, "Answer: ", "bike")
  assert fast.decode(cont) == " bike" and fast.decode(head) == "Answer:"


def _vocab(folder):
  tok = tokenizer_files.huggingface(folder)
  return vocabularies.HFVocabulary(tok)


def test_choice_split_holds_lm_evals_ids(folder, tmp_path):
  from transformers import PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast.from_pretrained(folder)
  rows = [{"q": "who is oldest ?", "c": ["Ann", "Bob", "the dog"], "y": 0},
          {"q": "the cat sat on the", "c": ["mat", "bone"], "y": 1}]
  path = tmp_path / "dev.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  name = jsonl.register(JsonlTask(name="tok_choice", splits={"dev": str(path)},
                                  prompt="Question: {q}\nAnswer:", kind="choice",
                                  choices="c", label="y", metric="acc_norm"))
  d = task_splits.materialize(name, "dev", None, _vocab(folder))
  for i, r in enumerate(rows):
    context = f"Question: {r['q']}\nAnswer:"
    for j, choice in enumerate(r["c"]):
      want_ctx, want_cont = scoring.encode_pair(
          lambda s: fast.encode(s, add_special_tokens=False), context, " " + choice)
      mask = np.asarray(d.target_mask[i, j])
      tokens = np.asarray(d.tokens[i, j])
      assert tokens[mask].tolist() == want_cont
      assert tokens[:int(np.argmax(mask))].tolist() == [fast.bos_token_id] + want_ctx
      assert float(d.choice_norm[i, j]) == len(choice)  # acc_norm: per character


def test_stored_truncation_and_padding_are_ignored(folder, tmp_path):
  from transformers import PreTrainedTokenizerFast
  raw = json.loads(open(f"{folder}/tokenizer.json").read())
  raw["truncation"] = {"direction": "Right", "max_length": 96, "strategy": "LongestFirst",
                       "stride": 0}
  raw["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}
  cut = tmp_path / "cut"
  hf_fixtures.train_bpe(str(cut))
  (cut / "tokenizer.json").write_text(json.dumps(raw))
  ids = _vocab(str(cut)).encode(LONG)
  want = PreTrainedTokenizerFast.from_pretrained(str(cut)).encode(LONG, add_special_tokens=False)
  assert len(ids) > 96 and ids == want
  assert ids == _vocab(folder).encode(LONG)


def _chat_task(tmp_path, name):
  path = tmp_path / "dev.jsonl"
  path.write_text(json.dumps({"q": "hi", "a": "yo"}) + "\n")
  return jsonl.register(JsonlTask(name=name, splits={"dev": str(path)}, prompt="{q}",
                                  target="{a}", chat_template=True))


@pytest.mark.parametrize("template,message", [
    (None, "has no chat template"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_a_missing_or_raising_chat_template_is_one_line(tmp_path, template, message):
  folder = tmp_path / "tok"
  hf_fixtures.train_bpe(str(folder), chat_template=template)
  name = _chat_task(tmp_path, f"chat_{bool(template)}")
  with pytest.raises(UserError, match=message):
    task_splits.materialize(name, "dev", None, _vocab(str(folder)))
