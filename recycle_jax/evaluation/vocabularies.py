"""The pool's tokenizer as a seqio Vocabulary, for evaluation (seqio and TensorFlow).

Every task evaluated on a pool is tokenized with the pool's tokenizer (read, hashed and
checked without seqio by `tokenizer_files`): a task declares `POOL` (the placeholder
below) and `bind` instantiates it with the pool's vocabulary; a task that declares a
concrete vocabulary must declare the pool's. Vocabularies compare by the tokenizer's
content hash, so two copies of one tokenizer are equal and two tokenizers never are.

  HFVocabulary             a Hugging Face tokenizer through its `tokenizers` backend
                           (seqio has no Hugging Face vocabulary); the chat template
                           rendered with jinja2.
  SentencePieceVocabulary  seqio's, over tokenizer.model.
  seqio.ByteVocabulary     the byte family's vocabulary (transformer.VOCAB).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from recycle_jax.models import transformer
from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.checkpoint_io.tokenizer_files import Tokenizer


def _text(b) -> str:
  """A numpy_function's string argument (0-d object array of bytes) as text."""
  b = b.item() if isinstance(b, np.ndarray) else b
  return b.decode("utf-8") if isinstance(b, bytes) else str(b)


class HFVocabulary(seqio.Vocabulary):
  """A Hugging Face fast tokenizer (tokenizer.json) as a seqio Vocabulary.

  encode adds no special tokens (seqio appends EOS itself); `add_bos` says whether the
  tokenizer's own post-processor starts a sequence with BOS, which evaluation then puts
  before each prompt as transformers would. Equal by the tokenizer's content hash.
  """

  def __init__(self, source: Tokenizer):
    super().__init__(extra_ids=0)
    self.source, self.tokenizer = source, source.backend
    self.folder, self.content_hash = source.folder, source.content_hash
    self.add_bos, self.chat_template = source.add_bos, source.chat_template

  # seqio.Vocabulary ------------------------------------------------------------------
  @property
  def eos_id(self) -> int:
    return self.source.eos_id

  @property
  def bos_id(self) -> int | None:
    return self.source.bos_id

  @property
  def pad_id(self) -> int:
    return self.source.pad_id

  @property
  def unk_id(self) -> int | None:
    return self.source.unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self.source.vocab_size

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
    return self.render_chat([{"role": "user", "content": text}])

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                  continue_final_message: bool = False) -> str:
    """`messages` rendered by the tokenizer's chat template, as transformers'
    apply_chat_template(tokenize=False) does: ready for the assistant's answer, or
    (continue_final_message) cut right after the last message's content so that the
    model continues it (lm-eval's gen_prefix)."""
    check(self.chat_template is not None, "the tokenizer has no chat template",
          self.folder, "use a tokenizer with chat_template, or drop the task's chat flag")
    tokens = self.source.special_tokens
    try:
      text = _render(self.chat_template, messages,
                     add_generation_prompt=add_generation_prompt,
                     bos_token=tokens.get("bos") or "", eos_token=tokens.get("eos") or "")
    except UserError as e:  # the line names the template's tokenizer
      raise UserError(e.message.replace("(chat template)", "(chat template of the tokenizer "
                                        f"in {self.folder})", 1)) from None
    if continue_final_message:
      last = str(messages[-1]["content"]).strip()
      check(last in text, "the chat template drops the last message's text, so it cannot be "
            "continued", "chat template", "use a template that renders every message")
      text = text[:text.rindex(last) + len(last)]
    return text


CHAT_TEMPLATE_SECONDS = 5.0  # one rendering (real templates take well under 1 ms)
CHAT_TEMPLATE_CHARS = 1 << 24  # the most a `*` or `**` in a template may build


@functools.lru_cache(None)
def _template(source: str):
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Bounded(ImmutableSandboxedEnvironment):
    """transformers' sandbox, and `*` / `**` that cannot build a huge value."""
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
      if operator == "**":
        check(not isinstance(right, (int, float)) or abs(right) <= 64, f"{left!r} ** {right!r} "
              "is too large", "chat template", "fix chat_template in tokenizer_config.json")
      elif isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
        seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
        check(not isinstance(n, int) or len(seq) * n <= CHAT_TEMPLATE_CHARS, "a `*` builds "
              f"more than {CHAT_TEMPLATE_CHARS} items", "chat template",
              "fix chat_template in tokenizer_config.json")
      return super().call_binop(context, operator, left, right)

  def raise_exception(message):
    raise UserError(f"chat template error: {message}", "chat template")
  env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent,
                                                                 ensure_ascii=False)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
  return env.from_string(source)


def _render(source: str, messages: Sequence[dict], add_generation_prompt: bool = True,
            **special) -> str:
  try:
    template = _template(source)
    return _bounded(lambda: template.render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            **special))
  except UserError:
    raise
  except RecursionError:
    raise UserError("the chat template recurses too deeply", "chat template",
                    "fix chat_template in tokenizer_config.json") from None
  except Exception as e:  # jinja2 syntax and runtime errors
    raise UserError(f"the chat template cannot be rendered: {type(e).__name__}: {e}",
                    "chat template", "fix chat_template in tokenizer_config.json") from None


def _bounded(render):
  """render(), ended after CHAT_TEMPLATE_SECONDS: a trace function checks the clock on
  every line the template's compiled code runs (a loop of loops ends in one line, in any
  thread; signals still end the process, as the code is Python)."""
  deadline = time.monotonic() + CHAT_TEMPLATE_SECONDS

  def tracer(frame, event, arg):
    if time.monotonic() > deadline:
      raise UserError(f"the chat template did not finish within {CHAT_TEMPLATE_SECONDS:g} s",
                      "chat template", "fix chat_template in tokenizer_config.json (a loop "
                      "that does not end?)")
    return tracer
  old = sys.gettrace()
  sys.settrace(tracer)
  try:
    return render()
  finally:
    sys.settrace(old)


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary over a checkpoint's tokenizer.model, equal by the
  model's content hash."""

  def __init__(self, source: Tokenizer):
    super().__init__(os.path.join(source.folder, "tokenizer.model"))
    self.source, self.folder, self.content_hash = source, source.folder, source.content_hash
    self.add_bos = False

  def __eq__(self, other) -> bool:
    return isinstance(other, SentencePieceVocabulary) and \
        other.content_hash == self.content_hash

  def __hash__(self) -> int:
    return hash(self.content_hash)


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
  """A task's vocabulary's content hash (the pool's tokenizer's, for the pool's)."""
  if isinstance(vocab, (HFVocabulary, SentencePieceVocabulary)):
    return vocab.content_hash
  if isinstance(vocab, seqio.ByteVocabulary) and vocab.extra_ids == 0:
    return tokenizer_files.BYTE.content_hash
  raise UserError(f"vocabulary {type(vocab).__name__} has no content hash", str(vocab),
                  "use a Hugging Face, SentencePiece or byte vocabulary")


@functools.lru_cache(None)
def of(tok: Tokenizer) -> seqio.Vocabulary:
  """The seqio Vocabulary of a tokenizer (one per content hash)."""
  if tok.kind == "byte":
    return transformer.VOCAB
  return {"huggingface": HFVocabulary, "sentencepiece": SentencePieceVocabulary}[tok.kind](tok)


# ----------------------------------------------------------------------------- pools

def for_evaluation(tok: Tokenizer | None, model_vocab_size: int | None,
                   where: str) -> seqio.Vocabulary:
  """The pool's tokenizer as a seqio Vocabulary, checked to fit the model it tokenizes
  for."""
  check(tok is not None, "the pool has no tokenizer, and evaluation needs one", where,
        "put the tokenizer files (tokenizer.json, or tokenizer.model) in the checkpoints, "
        "or `recycle-jax convert` them from a Hugging Face folder that has them")
  check(model_vocab_size is None or tok.vocab_size <= model_vocab_size,
        f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
        f"{model_vocab_size}", where, "the tokenizer must be the one the model was trained with")
  return of(tok)


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
