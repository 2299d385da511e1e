"""The pool's tokenizer as a seqio Vocabulary: Hugging Face, SentencePiece or bytes.

A pool's vocabulary is read from its checkpoints (a Hugging Face folder's tokenizer files,
or the `tokenizer/` folder and metadata that recycle_jax writes beside an Orbax
checkpoint) and every task evaluated on the pool is tokenized with it: a task declares
`POOL` (the placeholder below) and `bind` instantiates it with the pool's vocabulary; a
task that declares a concrete vocabulary must declare the pool's. Vocabularies compare by
content hash, so two copies of one tokenizer are equal and two tokenizers never are.

  HFVocabulary          tokenizer.json through the pinned `tokenizers` library (seqio has
                        no Hugging Face vocabulary); special ids from tokenizer_config.json
                        or config.json; the chat template rendered with jinja2.
  SentencePiece         seqio.SentencePieceVocabulary over tokenizer.model.
  seqio.ByteVocabulary  the byte family's vocabulary (models.VOCAB).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from recycle_jax.errors import UserError, check

TOKENIZER_DIR = "tokenizer"  # beside an Orbax checkpoint's arrays
# Files a Hugging Face tokenizer may come with; copied as they are.
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "chat_template.jinja", "tokenizer.model")
BYTE = seqio.ByteVocabulary()


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _token_id(tok, value) -> int | None:
  """An id from a special-token entry of tokenizer_config.json (text or AddedToken dict)."""
  if isinstance(value, dict):
    value = value.get("content")
  return tok.token_to_id(value) if isinstance(value, str) else None


def _text(b) -> str:
  """A numpy_function's string argument (0-d object array of bytes) as text."""
  b = b.item() if isinstance(b, np.ndarray) else b
  return b.decode("utf-8") if isinstance(b, bytes) else str(b)


def _first_id(value) -> int | None:
  if isinstance(value, list):  # e.g. Llama 3 instruct: several EOS ids
    value = value[0] if value else None
  return value if isinstance(value, int) else None


class HFVocabulary(seqio.Vocabulary):
  """A Hugging Face fast tokenizer (tokenizer.json) as a seqio Vocabulary.

  encode adds no special tokens (seqio appends EOS itself); `add_bos` says whether the
  tokenizer's own post-processor starts a sequence with BOS, which evaluation then puts
  before each prompt as transformers would. Equal by content hash: tokenizer.json
  (canonical JSON) and the special ids.
  """

  def __init__(self, folder: str, config: Mapping | None = None):
    from tokenizers import Tokenizer
    super().__init__(extra_ids=0)
    self.folder = os.path.abspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    try:
      with open(path, "rb") as f:
        raw = json.loads(f.read())
      self.tokenizer = Tokenizer.from_str(json.dumps(raw))
    except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception
      raise UserError(f"tokenizer.json is unreadable: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}", path,
                      "save the tokenizer with transformers' save_pretrained") from None
    tc = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    config = dict(config or {})
    tok = self.tokenizer
    ids = lambda key: _token_id(tok, tc.get(f"{key}_token"))  # noqa: E731
    self._eos = ids("eos") if ids("eos") is not None else _first_id(config.get("eos_token_id"))
    self._bos = ids("bos") if ids("bos") is not None else _first_id(config.get("bos_token_id"))
    self._pad = ids("pad") if ids("pad") is not None else _first_id(config.get("pad_token_id"))
    self._unk = ids("unk")
    check(self._eos is not None, "the tokenizer has no EOS token (tokenizer_config.json "
          "eos_token, config.json eos_token_id)", folder,
          "set eos_token in tokenizer_config.json: generation and exact match need it")
    probe = tok.encode("a", add_special_tokens=True).ids
    self.add_bos = bool(probe) and self._bos is not None and probe[0] == self._bos
    template = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template):
      with open(template, encoding="utf-8") as f:
        self.chat_template = f.read()
    else:
      ct = tc.get("chat_template")
      if isinstance(ct, list):  # named templates: the default one
        ct = next((t.get("template") for t in ct if t.get("name") == "default"), None)
      self.chat_template = ct if isinstance(ct, str) else None
    self._tokens = {k: (tc.get(f"{k}_token") or {}).get("content")
                    if isinstance(tc.get(f"{k}_token"), dict) else tc.get(f"{k}_token")
                    for k in ("bos", "eos")}
    self.content_hash = _sha(json.dumps(
        {"kind": "huggingface", "tokenizer": raw,
         "ids": [self._bos, self._eos, self._pad, self._unk]}, sort_keys=True).encode())

  # seqio.Vocabulary ------------------------------------------------------------------
  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def pad_id(self) -> int:
    return self._pad if self._pad is not None else 0

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A scalar string -> int32 ids [n]; strings of rank >= 1 -> a ragged tensor."""
    def one(x):
      ids = tf.numpy_function(lambda b: np.asarray(self._encode(_text(b)), np.int32),
                              [x], tf.int32, stateful=False)
      return tf.ensure_shape(ids, [None])
    s = tf.convert_to_tensor(s)
    if s.shape.rank == 0:
      return one(s)
    flat = tf.reshape(s, [-1])
    out = tf.map_fn(one, flat, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
    return out

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., n] -> strings [...]."""
    def run(a):
      a = np.asarray(a)
      flat = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
      out = np.asarray([self._decode(r).encode() for r in flat], object)
      return out.reshape(a.shape[:-1])
    ids = tf.convert_to_tensor(ids)
    out = tf.numpy_function(run, [ids], tf.string, stateful=False)
    return tf.ensure_shape(out, ids.shape[:-1])

  # equality by content ---------------------------------------------------------------
  def __eq__(self, other) -> bool:
    return isinstance(other, HFVocabulary) and other.content_hash == self.content_hash

  def __hash__(self) -> int:
    return hash(self.content_hash)

  def __str__(self) -> str:
    return f"HFVocabulary({self.folder}, sha256 {self.content_hash[:12]})"

  # chat template ---------------------------------------------------------------------
  def apply_chat_template(self, text: str) -> str:
    """The prompt as one user turn of the tokenizer's chat template, ready for the
    assistant's answer (what transformers' apply_chat_template(add_generation_prompt=True,
    tokenize=False) gives)."""
    check(self.chat_template is not None, "the tokenizer has no chat template",
          self.folder, "use a tokenizer with chat_template, or drop the task's chat flag")
    return _render(self.chat_template, [{"role": "user", "content": text}],
                   bos_token=self._tokens["bos"] or "", eos_token=self._tokens["eos"] or "")

  def files(self) -> dict[str, str]:
    """{file name: path} of the tokenizer files to copy with the pool's checkpoints."""
    return {f: os.path.join(self.folder, f) for f in HF_FILES
            if os.path.isfile(os.path.join(self.folder, f))}


@functools.lru_cache(None)
def _template(source: str):
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  def raise_exception(message):
    raise UserError(f"chat template error: {message}", "chat template")
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent,
                                                                 ensure_ascii=False)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
  return env.from_string(source)


def _render(source: str, messages: Sequence[dict], **special) -> str:
  try:
    return _template(source).render(messages=list(messages), add_generation_prompt=True,
                                    **special)
  except UserError:
    raise
  except Exception as e:  # jinja2 syntax and runtime errors
    raise UserError(f"the chat template cannot be rendered: {type(e).__name__}: {e}",
                    "chat template", "fix chat_template in tokenizer_config.json") from None


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary over a checkpoint's tokenizer.model, equal by the
  model's content hash, with the file it came from."""

  def __init__(self, path: str):
    super().__init__(path)
    try:
      _ = self.tokenizer  # loads the model now: a bad file is reported here, by name
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
      raise UserError(f"tokenizer.model is not a SentencePiece model: {e}", path,
                      "copy the tokenizer.model the checkpoint was trained with") from None
    self.folder = os.path.dirname(os.path.abspath(path))
    self.content_hash = _sha(b"sentencepiece:" + self.sp_model)
    self.add_bos = False

  def __eq__(self, other) -> bool:
    return isinstance(other, SentencePieceVocabulary) and \
        other.content_hash == self.content_hash

  def __hash__(self) -> int:
    return hash(self.content_hash)

  def files(self) -> dict[str, str]:
    return {"tokenizer.model": os.path.join(self.folder, "tokenizer.model")}


class PoolVocabulary(seqio.Vocabulary):
  """What a task declares when it is tokenized with the pool's vocabulary (`bind`)."""

  def __init__(self):
    super().__init__(extra_ids=0)

  def _refuse(self, *_):
    raise UserError("a task declaring the pool's vocabulary was read without a pool",
                    "evaluation", "pass the pool's vocabulary (evaluation.materialize)")

  eos_id = unk_id = _base_vocab_size = property(lambda self: self._refuse())
  _encode = _decode = _encode_tf = _decode_tf = _refuse

  def __eq__(self, other) -> bool:
    return isinstance(other, PoolVocabulary)

  def __hash__(self) -> int:
    return hash("PoolVocabulary")


POOL = PoolVocabulary()


# ----------------------------------------------------------------------------- identity

def content_hash(vocab: seqio.Vocabulary) -> str:
  if isinstance(vocab, (HFVocabulary, SentencePieceVocabulary)):
    return vocab.content_hash
  if isinstance(vocab, seqio.ByteVocabulary):
    return _sha(f"byte:{vocab.extra_ids}".encode())
  raise UserError(f"vocabulary {type(vocab).__name__} has no content hash", str(vocab),
                  "use a Hugging Face, SentencePiece or byte vocabulary")


def describe(vocab: seqio.Vocabulary) -> dict:
  """The metadata recycle_jax stores for a vocabulary: kind, content hash, size, files."""
  kind = {HFVocabulary: "huggingface", SentencePieceVocabulary: "sentencepiece"}.get(
      type(vocab), "byte")
  files = sorted(vocab.files()) if hasattr(vocab, "files") else []
  return {"kind": kind, "sha256": content_hash(vocab), "vocab_size": vocab.vocab_size,
          "files": files}


def short(vocab: seqio.Vocabulary) -> str:
  d = describe(vocab)
  return f"{d['kind']} tokenizer sha256 {d['sha256'][:12]}, {d['vocab_size']} tokens"


# ----------------------------------------------------------------------------- reading

def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {os.path.basename(path)}: {e}", path,
                    "write it with transformers' save_pretrained") from None
  check(isinstance(data, dict), f"{os.path.basename(path)} is not a JSON object", path)
  return data


def from_folder(folder: str, config: Mapping | None = None) -> seqio.Vocabulary | None:
  """The tokenizer stored in `folder` (tokenizer.json first, then tokenizer.model), or
  None when it holds neither. `config` is the model's config.json (fallback ids)."""
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    return HFVocabulary(folder, config)
  if os.path.isfile(os.path.join(folder, "tokenizer.model")):
    return SentencePieceVocabulary(os.path.join(folder, "tokenizer.model"))
  return None


def from_metadata(path: str, stored: Mapping | None) -> seqio.Vocabulary | None:
  """The vocabulary recorded for the Orbax checkpoint at `path` (`describe`'s record in
  its metadata), checked against the copied files' content hash."""
  if not stored:
    return None
  if stored.get("kind") == "byte":
    return BYTE
  folder = os.path.join(path, TOKENIZER_DIR)
  vocab = from_folder(folder) if os.path.isdir(folder) else None
  check(vocab is not None, f"the checkpoint's {stored.get('kind')} tokenizer files are "
        f"missing from {TOKENIZER_DIR}/", path, "copy them back or re-convert the checkpoint")
  check(content_hash(vocab) == stored.get("sha256"), "the checkpoint's tokenizer files do not "
        "match the content hash in its metadata (edited after it was written?)", folder,
        "restore the original tokenizer files")
  return vocab


def of_checkpoint(path: str, custom: Mapping) -> seqio.Vocabulary | None:
  """The vocabulary of the checkpoint at `path` from its custom metadata: the tokenizer
  recorded there, else the byte vocabulary for the byte family's model (whose checkpoints
  may predate recorded tokenizers); None when it has no tokenizer."""
  rj = custom.get("recycle_jax") or {}
  if os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face folder
    return from_folder(path, rj.get("hf_config"))
  vocab = from_metadata(path, rj.get("vocabulary"))
  model = rj.get("model")
  if vocab is None and isinstance(model, dict) and model.get("family", "byte") == "byte":
    vocab = BYTE  # the byte family's own vocabulary
  return vocab


def write_files(vocab: seqio.Vocabulary | None, folder: str) -> None:
  """Copies the tokenizer files of `vocab` (none for bytes) into `folder`."""
  if vocab is None or not hasattr(vocab, "files"):
    return
  os.makedirs(folder, exist_ok=True)
  for name, src in vocab.files().items():
    shutil.copyfile(src, os.path.join(folder, name))


# ----------------------------------------------------------------------------- pools

def check_pool(names: Sequence[str], vocabs: Sequence[seqio.Vocabulary | None],
               model_vocab_sizes: Sequence[int | None], where: str) -> None:
  """Every member has the first member's tokenizer (by content hash) and vocab size; a
  member without a tokenizer in a pool whose others have one is refused too."""
  ref, ref_name = vocabs[0], names[0]
  for name, v, size in zip(names[1:], vocabs[1:], model_vocab_sizes[1:]):
    check(model_vocab_sizes[0] == size, f"checkpoint {name!r} has vocab_size {size} but "
          f"{ref_name!r} has {model_vocab_sizes[0]}", where,
          "every pool member must share one vocabulary")
    if v is None and ref is None:
      continue
    check(v is not None, f"checkpoint {name!r} has no tokenizer but {ref_name!r} has one",
          where, "copy the pool's tokenizer files into that checkpoint")
    check(ref is not None, f"checkpoint {ref_name!r} has no tokenizer but {name!r} has one",
          where, "copy the pool's tokenizer files into that checkpoint")
    check(content_hash(v) == content_hash(ref),
          f"checkpoint {name!r} has a different tokenizer ({short(v)}) from {ref_name!r} "
          f"({short(ref)})", where, "a pool must share one tokenizer; drop or re-tokenize it")


def for_evaluation(vocab: seqio.Vocabulary | None, model_vocab_size: int | None,
                   where: str) -> seqio.Vocabulary:
  """The pool's vocabulary, checked to fit the model it tokenizes for."""
  check(vocab is not None, "the pool has no tokenizer, and evaluation needs one", where,
        "put the tokenizer files (tokenizer.json, or tokenizer.model) in the checkpoints, "
        "or `recycle-jax convert` them from a Hugging Face folder that has them")
  check(model_vocab_size is None or vocab.vocab_size <= model_vocab_size,
        f"the tokenizer has {vocab.vocab_size} tokens but the model's vocab_size is "
        f"{model_vocab_size}", where, "the tokenizer must be the one the model was trained with")
  return vocab


# ----------------------------------------------------------------------------- tasks

def declared(task: seqio.Task) -> dict[str, seqio.Vocabulary]:
  return {k: f.vocabulary for k, f in task.output_features.items()}


def bind(task: seqio.Task, vocab: seqio.Vocabulary) -> seqio.Task:
  """`task` tokenized with `vocab`: features declaring `POOL` take `vocab`; a feature
  declaring another vocabulary is refused with one line. The registry is not changed."""
  for key, v in declared(task).items():
    if not isinstance(v, PoolVocabulary):
      check(v == vocab, f"task {task.name!r} declares feature {key!r} with vocabulary {v} "
            f"but the model's is {vocab}", f"task {task.name!r}",
            "declare vocabularies.POOL in the task's output features (it then takes the "
            "pool's vocabulary), or evaluate it on a pool with its vocabulary")
  if all(v == vocab for v in declared(task).values()):
    return task
  features = {k: seqio.Feature(vocab if isinstance(f.vocabulary, PoolVocabulary)
                               else f.vocabulary, add_eos=f.add_eos, required=f.required,
                               dtype=f.dtype, rank=f.rank)
              for k, f in task.output_features.items()}
  return seqio.Task(task.name, task.source, features, preprocessors=task.preprocessors,
                    postprocess_fn=task.postprocessor, metric_fns=task.metric_fns,
                    shuffle_buffer_size=None)
