"""A checkpoint's tokenizer as files: read, hashed, copied and checked across a pool.

Nothing here imports seqio or TensorFlow, so `merge`, `convert` and `inspect` read, check
and copy tokenizers without them; evaluation wraps a `Tokenizer` as a seqio Vocabulary
(`vocabularies.for_evaluation`). A pool's tokenizer is read from its checkpoints (a
Hugging Face folder's tokenizer files, or the `tokenizer/` folder and metadata that
recycle_jax writes beside an Orbax checkpoint). Tokenizers compare by content hash, so two
copies of one tokenizer are equal and two tokenizers never are.

  huggingface    tokenizer.json through the pinned `tokenizers` library; special ids from
                 tokenizer_config.json, else config.json.
  sentencepiece  tokenizer.model.
  byte           the byte family's vocabulary (`BYTE`, no files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Sequence

from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.models import byte_vocab

TOKENIZER_DIR = "tokenizer"  # beside an Orbax checkpoint's arrays
# Files a Hugging Face tokenizer may come with; copied as they are.
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "chat_template.jinja", "tokenizer.model")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """A checkpoint's tokenizer: what merges copy, pools compare and evaluation wraps.

  Ids are seqio's conventions: `pad_id` is 0 when the tokenizer names no PAD; `add_bos`
  says whether its own post-processor starts a sequence with BOS (evaluation then puts
  BOS before each prompt, as transformers would).
  """
  kind: str  # huggingface | sentencepiece | byte
  content_hash: str  # sha256 of the tokenizer's content and special ids
  vocab_size: int  # ids it produces, added tokens included
  folder: str | None = None  # where its files are (None: bytes)
  eos_id: int | None = None
  bos_id: int | None = None
  pad_id: int = 0
  unk_id: int | None = None
  add_bos: bool = False
  chat_template: str | None = None
  special_tokens: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  backend: Any = None  # huggingface: the tokenizers.Tokenizer that encodes and decodes

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and other.content_hash == self.content_hash

  def __hash__(self) -> int:
    return hash(self.content_hash)

  def __str__(self) -> str:
    return f"{self.kind} tokenizer sha256 {self.content_hash[:12]}, {self.vocab_size} tokens"

  def files(self) -> dict[str, str]:
    """{file name: path} of the files to copy with the pool's checkpoints."""
    if self.folder is None:
      return {}
    names = HF_FILES if self.kind == "huggingface" else ("tokenizer.model",)
    return {f: os.path.join(self.folder, f) for f in names
            if os.path.isfile(os.path.join(self.folder, f))}

  def describe(self) -> dict:
    """The record recycle_jax stores in a checkpoint's metadata: kind, content hash, size,
    files (`from_metadata` checks the copied files against it)."""
    return {"kind": self.kind, "sha256": self.content_hash, "vocab_size": self.vocab_size,
            "files": sorted(self.files())}


# The byte family's: ids = byte + 3 (0 pad, 1 eos, 2 unk), as seqio.ByteVocabulary's.
BYTE = Tokenizer("byte", _sha(b"byte:0"), byte_vocab.BYTE_VOCAB_SIZE, eos_id=byte_vocab.EOS_ID,
                 pad_id=byte_vocab.PAD_ID, unk_id=byte_vocab.UNK_ID)


# ----------------------------------------------------------------------------- reading

def read_json_object(path: str) -> dict | None:
  """A tokenizer's JSON file (tokenizer.json, tokenizer_config.json), strictly, as an
  object; None if absent."""
  if not os.path.isfile(path):
    return None
  data = validation.load_json(path, os.path.basename(path),
                              "write it with transformers' save_pretrained")
  check(isinstance(data, dict), f"{os.path.basename(path)} is not a JSON object", path)
  return data


def _token_id(tok, value) -> int | None:
  """An id from a special-token entry of tokenizer_config.json (text or AddedToken dict)."""
  if isinstance(value, dict):
    value = value.get("content")
  return tok.token_to_id(value) if isinstance(value, str) else None


def _first_id(value) -> int | None:
  if isinstance(value, list):  # e.g. Llama 3 instruct: several EOS ids
    value = value[0] if value else None
  return value if isinstance(value, int) else None


def huggingface(folder: str, config: Mapping | None = None) -> Tokenizer:
  """tokenizer.json in `folder`, special ids from tokenizer_config.json or `config` (the
  model's config.json). Hashed over tokenizer.json (canonical JSON) and the special ids."""
  from tokenizers import Tokenizer as Backend
  path = os.path.join(folder, "tokenizer.json")
  raw = validation.load_json(path, "tokenizer.json",  # strictly: UTF-8, no NaN
                             "save the tokenizer with transformers' save_pretrained")
  try:
    tok = Backend.from_str(json.dumps(raw))
  except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception
    raise UserError(f"tokenizer.json is unreadable: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}", path,
                    "save the tokenizer with transformers' save_pretrained") from None
  # A truncation or padding block stored in tokenizer.json (left by training with
  # truncation=True) is ignored, as transformers' fast tokenizers ignore it unless a call
  # asks for truncation: prompts are never cut or padded silently.
  tok.no_truncation()
  tok.no_padding()
  tc = read_json_object(os.path.join(folder, "tokenizer_config.json")) or {}
  config = dict(config or {})
  ids = {}
  for key in ("eos", "bos", "pad"):
    ids[key] = _token_id(tok, tc.get(f"{key}_token"))
    ids[key] = ids[key] if ids[key] is not None else _first_id(config.get(f"{key}_token_id"))
  ids["unk"] = _token_id(tok, tc.get("unk_token"))
  check(ids["eos"] is not None, "the tokenizer has no EOS token (tokenizer_config.json "
        "eos_token, config.json eos_token_id)", folder,
        "set eos_token in tokenizer_config.json: generation and exact match need it")
  probe = tok.encode("a", add_special_tokens=True).ids
  template = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(template):
    with open(template, encoding="utf-8") as f:
      chat = f.read()
  else:
    chat = tc.get("chat_template")
    if isinstance(chat, list):  # named templates: the default one
      chat = next((t.get("template") for t in chat if t.get("name") == "default"), None)
    chat = chat if isinstance(chat, str) else None
  text = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
  return Tokenizer(
      "huggingface", _sha(json.dumps({"kind": "huggingface", "tokenizer": raw,
                                      "ids": [ids[k] for k in ("bos", "eos", "pad", "unk")]},
                                     sort_keys=True).encode()),
      tok.get_vocab_size(with_added_tokens=True), os.path.abspath(folder), eos_id=ids["eos"],
      bos_id=ids["bos"], pad_id=ids["pad"] if ids["pad"] is not None else 0,
      unk_id=ids["unk"],
      add_bos=bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"],
      chat_template=chat, special_tokens={k: text(tc.get(f"{k}_token")) for k in ("bos", "eos")},
      backend=tok)


def sentencepiece(path: str) -> Tokenizer:
  """tokenizer.model at `path`, hashed over the serialized model seqio reads."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2
  try:
    with open(path, "rb") as f:
      model = sentencepiece_model_pb2.ModelProto.FromString(f.read()).SerializeToString()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
  except Exception as e:  # protobuf's DecodeError, sentencepiece's RuntimeError, OSError
    raise UserError(f"tokenizer.model is not a SentencePiece model: {e}", path,
                    "copy the tokenizer.model the checkpoint was trained with") from None
  some = lambda i: i if i >= 0 else None  # noqa: E731 (sentencepiece says -1 for none)
  return Tokenizer("sentencepiece", _sha(b"sentencepiece:" + model), sp.GetPieceSize(),
                   os.path.dirname(os.path.abspath(path)), eos_id=some(sp.eos_id()),
                   bos_id=some(sp.bos_id()), pad_id=0, unk_id=some(sp.unk_id()))


def from_folder(folder: str, config: Mapping | None = None) -> Tokenizer | None:
  """The tokenizer stored in `folder` (tokenizer.json first, then tokenizer.model), or
  None when it holds neither. `config` is the model's config.json (fallback ids)."""
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    return huggingface(folder, config)
  if os.path.isfile(os.path.join(folder, "tokenizer.model")):
    return sentencepiece(os.path.join(folder, "tokenizer.model"))
  return None


def from_metadata(path: str, stored: Mapping | None) -> Tokenizer | None:
  """The tokenizer recorded for the Orbax checkpoint at `path` (`Tokenizer.describe`'s
  record in its metadata), checked against the copied files' content hash."""
  if not stored:
    return None
  if stored.get("kind") == "byte":
    return BYTE
  folder = os.path.join(path, TOKENIZER_DIR)
  tok = from_folder(folder) if os.path.isdir(folder) else None
  check(tok is not None, f"the checkpoint's {stored.get('kind')} tokenizer files are "
        f"missing from {TOKENIZER_DIR}/", path, "copy them back or re-convert the checkpoint")
  check(tok.content_hash == stored.get("sha256"), "the checkpoint's tokenizer files do not "
        "match the content hash in its metadata (edited after it was written?)", folder,
        "restore the original tokenizer files")
  return tok


def of_checkpoint(path: str, custom: Mapping) -> Tokenizer | None:
  """The tokenizer of the checkpoint at `path` from its custom metadata: the one recorded
  there, else the byte vocabulary for the byte family's model (whose checkpoints may
  predate recorded tokenizers); None when it has no tokenizer."""
  rj = custom.get("recycle_jax") or {}
  if os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face folder
    return from_folder(path, rj.get("hf_config"))
  tok = from_metadata(path, rj.get("vocabulary"))  # the stored key (checkpoints.save)
  model = rj.get("model")
  if tok is None and isinstance(model, dict) and model.get("family", "byte") == "byte":
    tok = BYTE  # the byte family's own vocabulary
  return tok


def write_files(tok: Tokenizer | None, folder: str) -> None:
  """Copies the files of `tok` (none for bytes) into `folder`."""
  if tok is None or not tok.files():
    return
  os.makedirs(folder, exist_ok=True)
  for name, src in tok.files().items():
    shutil.copyfile(src, os.path.join(folder, name))


# ----------------------------------------------------------------------------- pools

def check_pool(names: Sequence[str], toks: Sequence[Tokenizer | None],
               model_vocab_sizes: Sequence[int | None], where: str) -> None:
  """Every member has the first member's tokenizer (by content hash) and vocab size; a
  member without a tokenizer in a pool whose others have one is refused too."""
  ref, ref_name = toks[0], names[0]
  for name, t, size in zip(names[1:], toks[1:], model_vocab_sizes[1:]):
    check(model_vocab_sizes[0] == size, f"checkpoint {name!r} has vocab_size {size} but "
          f"{ref_name!r} has {model_vocab_sizes[0]}", where,
          "every pool member must share one vocabulary")
    if t is None and ref is None:
      continue
    check(t is not None, f"checkpoint {name!r} has no tokenizer but {ref_name!r} has one",
          where, "copy the pool's tokenizer files into that checkpoint")
    check(ref is not None, f"checkpoint {ref_name!r} has no tokenizer but {name!r} has one",
          where, "copy the pool's tokenizer files into that checkpoint")
    check(t == ref, f"checkpoint {name!r} has a different tokenizer ({t}) from {ref_name!r} "
          f"({ref})", where, "a pool must share one tokenizer; drop or re-tokenize it")
