"""The tokenizer travels with the pool: read without seqio (tokenizer_files), kept in
converted and merged checkpoints, checked across the pool, and for evaluation a seqio
Vocabulary (same ids as transformers) used for every task."""
import hashlib
import os
import shutil

import jax
import pytest
import seqio
import tensorflow as tf

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.evaluation import scoring
from recycle_jax.evaluation import task_splits
from recycle_jax import cli
from recycle_jax.models import transformer
from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.evaluation import vocabularies
from recycle_jax.runtime.errors import UserError

import hf_fixtures  # noqa: E402  (tests/ is on the path)

import transformers  # noqa: E402 (pinned test dependency)
TEXTS = ["the cat sat on the mat .", "Ann is older than Bob . who is oldest ?",
         "print(x[::-1]) fox owl", "ünïcödé and 12345"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  hf_fixtures.train_bpe(d)
  return str(d)


def _vocab(folder):
  return vocabularies.of(tokenizer_files.from_folder(folder))


def test_hf_vocabulary_gives_transformers_ids(tok_dir):
  v = _vocab(tok_dir)
  ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert (v.eos_id, v.bos_id, v.pad_id) == (ref.eos_token_id, ref.bos_token_id,
                                            ref.pad_token_id)
  assert v.vocab_size == len(ref) and v.add_bos
  for t in TEXTS:
    ids = v.encode(t)
    assert ids == ref.encode(t, add_special_tokens=False)
    assert list(v.encode_tf(tf.constant(t)).numpy()) == ids
    assert v.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  batch = v.encode_tf(tf.constant(TEXTS[:2]))
  assert [list(r) for r in batch.to_list()] == [v.encode(t) for t in TEXTS[:2]]
  assert v.decode_tf(tf.constant([v.encode(TEXTS[0])])).numpy()[0].decode() == \
      v.decode(v.encode(TEXTS[0]))
  # The chat template renders as transformers renders it.
  want = ref.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert v.apply_chat_template("hi") == want == "<|user|>hi</s><|assistant|>"


def test_equality_is_by_content(tok_dir, tmp_path):
  copy = shutil.copytree(tok_dir, tmp_path / "copy")
  a, b = tokenizer_files.from_folder(tok_dir), tokenizer_files.from_folder(str(copy))
  assert a == b and a.content_hash == b.content_hash and a.folder != b.folder
  assert vocabularies.of(a) == vocabularies.of(b)
  assert vocabularies.content_hash(vocabularies.of(a)) == a.content_hash
  hf_fixtures.train_bpe(tmp_path / "other", text=hf_fixtures.TEXT.upper())
  c = tokenizer_files.from_folder(str(tmp_path / "other"))
  assert a != c and a != tokenizer_files.BYTE and vocabularies.of(a) != vocabularies.of(c)
  assert vocabularies.of(tokenizer_files.BYTE) is transformer.VOCAB
  assert vocabularies.content_hash(transformer.VOCAB) == tokenizer_files.BYTE.content_hash
  assert transformer.VOCAB.vocab_size == tokenizer_files.BYTE.vocab_size


def test_sentencepiece_tokenizer_model(tmp_path):
  import sentencepiece as spm
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(hf_fixtures.TEXT.split(" . ")) * 3)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                 vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  t = tokenizer_files.from_folder(str(tmp_path))
  assert t.describe()["kind"] == "sentencepiece" and (t.eos_id, t.bos_id) == (1, None)
  v = vocabularies.of(t)
  assert isinstance(v, vocabularies.SentencePieceVocabulary) and v.eos_id == 1
  assert v.decode(v.encode("the cat sat")) == "the cat sat"
  # Hashed over the bytes seqio reads, so records written before the split still match.
  assert t.content_hash == hashlib.sha256(b"sentencepiece:" + v.sp_model).hexdigest()
  assert t.vocab_size == v.vocab_size == 60


def _ckpt(path, tok, vocab_size, seed=0):
  cfg = transformer.ModelConfig(vocab_size=vocab_size, d_model=16, num_layers=1, num_heads=2,
                           num_kv_heads=1, d_ff=32, family="llama")
  checkpoints.save(str(path), transformer.init_params(cfg, jax.random.key(seed)),
                   {"model": cfg.to_dict()}, tokenizer=tok)
  return pool_manifest.Entry(os.path.basename(path), str(path))


def test_tasks_use_the_pools_tokenizer_and_pools_share_one(tok_dir, tmp_path):
  t = tokenizer_files.from_folder(tok_dir)
  size = t.vocab_size + 8  # embeddings padded past the tokenizer, as real models do
  a, b = _ckpt(tmp_path / "a", t, size), _ckpt(tmp_path / "b", t, size, seed=1)
  # The tokenizer is kept beside the Orbax checkpoint and read back, equal by content.
  assert sorted(os.listdir(tmp_path / "a" / "tokenizer")) == [
      "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
  meta = checkpoints.validate_pool(pool_manifest.make_pool([a, b]))
  assert meta.tokenizer == t
  v = vocabularies.for_evaluation(meta.tokenizer, size, "pool")
  assert v == vocabularies.of(t)
  # Every task is tokenized with it: prompts (BOS first, as transformers does) and choices,
  # split as lm-eval splits a request (the prompt's trailing space moves to the choice).
  d = task_splits.materialize("rj_reasoning", "dev", 4, v)
  row = task_splits.split_examples("rj_reasoning", "dev", v)[0]
  prompt, first = scoring.encode_pair(v.encode, row["inputs_pretokenized"].decode(),
                                      row["choices"][0].decode())
  assert list(d.tokens[0, 0, :len(prompt) + 1]) == [v.bos_id] + prompt
  assert list(d.tokens[0, 0][d.target_mask[0, 0]]) == first
  assert d.tokens.max() < v.vocab_size and d.tokens.max() > transformer.VOCAB.vocab_size
  # Members with another tokenizer, or another vocab size, are refused, both named.
  hf_fixtures.train_bpe(tmp_path / "tok2", text=hf_fixtures.TEXT.upper())
  other = tokenizer_files.from_folder(str(tmp_path / "tok2"))
  c = _ckpt(tmp_path / "c", other, size)
  with pytest.raises(UserError, match="checkpoint 'c' has a different tokenizer .* from 'a'"):
    checkpoints.validate_pool(pool_manifest.make_pool([a, c]))
  e = _ckpt(tmp_path / "e", t, size + 8)
  with pytest.raises(UserError, match="differs from 'a': vocab_size .*checkpoint 'e'"):
    checkpoints.validate_pool(pool_manifest.make_pool([a, e]))
  # A task that declares another vocabulary than the model's: one line.
  with pytest.raises(UserError, match="declares feature 'inputs' with vocabulary"):
    task_splits.bound_task("test_byte_declared", v) if _byte_task() else None
  # Tokenizer files edited after the checkpoint was written: refused by content hash.
  with open(tmp_path / "b" / "tokenizer" / "tokenizer_config.json", "a") as f:
    f.write(" ")
  shutil.copy(tmp_path / "tok2" / "tokenizer.json", tmp_path / "b" / "tokenizer")
  with pytest.raises(UserError, match="do not match the content hash"):
    checkpoints.validate_pool(pool_manifest.make_pool([a, b]))


def _byte_task() -> bool:
  if "test_byte_declared" not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        "test_byte_declared", source=seqio.FunctionDataSource(
            lambda split, shuffle_files=False, seed=None: tf.data.Dataset.from_tensor_slices(
                {"inputs": ["a"], "targets": ["b"]}), splits=("dev",)),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={"inputs": seqio.Feature(transformer.VOCAB),
                         "targets": seqio.Feature(transformer.VOCAB)})
  return True


def test_eval_refuses_a_checkpoint_without_tokenizer(tmp_path, capsys):
  _ckpt(tmp_path / "nt", None, 300)
  assert cli.main(["eval", f"--checkpoint={tmp_path / 'nt'}", "--tasks=rj_reasoning",
                   "--max_examples=2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the pool has no tokenizer")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_merges_keep_the_pools_tokenizer(tok_dir, tmp_path, streaming):
  import json
  t = tokenizer_files.from_folder(tok_dir)
  for name, seed in (("a", 0), ("b", 1)):
    _ckpt(tmp_path / name, t, t.vocab_size, seed)
  (tmp_path / "pool.json").write_text(json.dumps(
      {"checkpoints": [{"name": n, "path": n} for n in "ab"]}))
  out = tmp_path / "merged"
  assert cli.main(["merge", f"--pool={tmp_path / 'pool.json'}", f"--output={out}",
                   *(["--streaming"] if streaming else [])]) == 0
  meta = checkpoints.read_metadata(str(out))
  assert tokenizer_files.of_checkpoint(str(out), meta.custom) == t


def test_chat_template_flag_uses_the_pools_template(tok_dir, tmp_path):
  import json
  from recycle_jax.tasks import jsonl
  rows = [{"q": "who is oldest ?", "a": "Ann"}, {"q": "who is tallest ?", "a": "Bob"}]
  files = {}
  for split in ("dev", "test"):
    files[split] = str(tmp_path / f"{split}.jsonl")
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  jsonl.register(jsonl.JsonlTask(name="test_chat_pool", splits=files, prompt="{q}",
                                           target="{a}", kind="exact", chat_template=True))
  v = _vocab(tok_dir)
  ex = task_splits.split_examples("test_chat_pool", "dev", v)[0]
  assert ex["inputs_pretokenized"].decode() == "<|user|>who is oldest ?</s><|assistant|>"
  d = task_splits.materialize("test_chat_pool", "dev", None, v)
  assert list(d.prompts[0, :1]) == [v.bos_id]
