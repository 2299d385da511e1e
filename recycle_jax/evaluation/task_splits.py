"""Task splits read from their source: seqio tasks looked up, bound to the pool's
vocabulary, read once and materialized into `TaskData` (cached per vocabulary), the host
examples kept for the verifiers (`verify`), and fixed random subsets (`subset`) for
adaptive fidelity.

A task named `SOURCE:NAME` comes from another task source (`SOURCES`, e.g. lm-eval's
tasks as `lm_eval:NAME`), which materializes its splits and scores its device outputs on
the host itself.
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

from recycle_jax.models import decoding
from recycle_jax.evaluation import scoring
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.evaluation import kinds
from recycle_jax.evaluation.task_data import TaskData, pack
from recycle_jax.runtime.registry import Registry

if TYPE_CHECKING:  # seqio imports TensorFlow: only reading a task does (get_task)
  import seqio

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Source:
  """A task source besides seqio, for task names `NAME:...`.
  materialize(task name, split, max_examples, vocabulary, vocabulary key) -> TaskData of
  an on-host kind; score(d, outputs [K, ...]) -> [K] scores of K candidates' device
  outputs (what `verify` does for seqio's generate splits)."""
  name: str
  materialize: Callable[..., TaskData]
  score: Callable[[TaskData, Any], np.ndarray]


SOURCES: Registry[Source] = Registry("task source", "--tasks")


def source_of(name: str) -> Source | None:
  """The source of task `name` ('lm_eval:arc_easy' -> lm_eval's), None for seqio's."""
  prefix, sep, _ = name.partition(":")
  return SOURCES.get(prefix, "--tasks") if sep else None


def get_task(name: str) -> seqio.Task:
  import seqio
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = ", ".join(sorted(seqio.TaskRegistry.names()))
    raise UserError(f"unknown task {name!r}", "--tasks / search.tasks",
                    f"choose from: {known}") from None


def bound_task(name: str, vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
  """Task `name` tokenized with `vocabulary` (the pool's): tasks declaring
  `vocabularies.POOL` take it, one declaring another vocabulary is refused. Without a
  vocabulary, the task as it declares itself (which must be concrete)."""
  from recycle_jax.evaluation import vocabularies
  task = get_task(name)
  if vocabulary is not None:
    return vocabularies.bind(task, vocabulary)
  check(not any(isinstance(v, vocabularies.PoolVocabulary)
                for v in vocabularies.declared(task).values()),
        f"task {name!r} is tokenized with the pool's vocabulary, and none was given",
        f"task {name!r}", "evaluate it on a pool (its tokenizer is read from the checkpoints)")
  return task


_READ_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("read_limit",
                                                                         default=None)


def read_limit() -> int | None:
  """How many examples of a split are being read (None: all). A task source that can read
  its files partway (JSONL) reads only that many, so `max_examples=4` of a 500 MB file
  reads 4 lines."""
  return _READ_LIMIT.get()


def split_examples(name: str, split: str, vocabulary: seqio.Vocabulary | None = None,
                   limit: int | None = None) -> list[dict]:
  """The first `limit` (all: None) tokenized examples (seqio preprocessing) as numpy
  dicts. `split` is the name the search uses ('dev', 'test'); a task declared with other
  split names maps it (`scoring.Scoring.splits`)."""
  task = bound_task(name, vocabulary)
  split = scoring.split_name(name, split)
  check(split in task.splits, f"task {name!r} has no split {split!r}", "--split",
        f"choose from: {', '.join(task.splits)} (or map 'dev'/'test' to them: "
        "scoring.Scoring.splits)")
  token = _READ_LIMIT.set(limit)
  try:  # the source reads what the limit asks for when the dataset is built (here)
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  finally:
    _READ_LIMIT.reset(token)
  return list((ds if limit is None else ds.take(limit)).as_numpy_iterator())


def task_vocabulary(task: seqio.Task) -> seqio.Vocabulary:
  """The vocabulary a task's targets (and choices) are tokenized with."""
  return task.output_features["targets"].vocabulary


_MATERIALIZED: dict = {}
# (name, split, E, vocabulary key) -> (bound task, its E examples): what `verify` reads.
_HOST: dict = {}


def materialize(name: str, split: str, max_examples: int | None = None,
                vocabulary: seqio.Vocabulary | None = None) -> TaskData:
  """Reads a seqio task split once, tokenized with `vocabulary` (the pool's; see
  `bound_task`), and pads it into fixed-shape arrays as its kind says (`kinds.REGISTRY`; cached
  per vocabulary content)."""
  from recycle_jax.evaluation import vocabularies
  key = (name, split, max_examples,
         None if vocabulary is None else vocabularies.content_hash(vocabulary))
  if key not in _MATERIALIZED:
    source = source_of(name)
    make = source.materialize if source else _materialize
    _MATERIALIZED[key] = make(name, split, max_examples, vocabulary, key[3] or "")
  return _MATERIALIZED[key]


def forget_splits() -> None:
  """Drops every materialized split (after the embedded benchmark's splits changed)."""
  _MATERIALIZED.clear()


def _materialize(name: str, split: str, max_examples: int | None,
                 vocabulary: seqio.Vocabulary | None, vocab_key: str) -> TaskData:
  task = bound_task(name, vocabulary)
  vocab = task_vocabulary(task)  # the prompts' vocabulary, never another
  rows = split_examples(name, split, vocabulary, max_examples)
  check(len(rows) > 0, f"task {name!r} split {split!r} is empty", "--split")
  bos = [vocab.bos_id] if getattr(vocab, "add_bos", False) else []  # as transformers does
  prompts = [(bos if list(r["inputs"][:1]) != bos else []) + r["inputs"].tolist()
             for r in rows]
  how = scoring.of(task, "choices" in rows[0])
  check(how.kind != "choice" or "choices" in rows[0],
        f"task {name!r} is declared 'choice' but its examples have no choices",
        f"task {name!r}", "give every example `choices` and `label`")
  d = kinds.REGISTRY[how.kind].materialize(name, prompts, rows, vocab, how)
  _HOST[(name, split, len(rows), vocab_key)] = (task, rows)
  return d.replace(split=split, examples=len(rows), vocab_key=vocab_key)


def load_split(task_names: Sequence[str], split: str, max_examples: int | None = None,
               vocabulary: seqio.Vocabulary | None = None) -> tuple[TaskData, ...]:
  return tuple(materialize(t, split, max_examples, vocabulary) for t in task_names)


# ----------------------------------------------------------------------------- on the host

def verify(d: TaskData, tokens: np.ndarray) -> np.ndarray:
  """[K] scores of K candidates' continuations tokens [K, E', T] of a `generate` split,
  each decoded with the task's vocabulary and scored by its verifier
  (`scoring.score_texts`); a split of another source, by that source (`Source.score`)."""
  source = source_of(d.name)
  if source:
    return np.asarray(source.score(d, tokens), np.float32)
  task, rows = _HOST[(d.name, d.split, d.examples, d.vocab_key)]
  vocab = task_vocabulary(task)
  tokens = np.asarray(tokens)[:, :d.examples]
  return np.array([scoring.score_texts(task, rows, decoding.texts(vocab, t)) for t in tokens],
                  np.float32)


def subset(d: TaskData, fraction: float, seed: int) -> TaskData:
  """A host split cut to a fixed random subset of ceil(fraction * E) of its examples (at
  least one), in their original order and packed again: adaptive fidelity's first pass.
  The subset depends on the task's name and `seed` only, so it is the same in every
  generation and on resume."""
  check(0.0 < fraction <= 1.0, f"fidelity subset fraction {fraction}",
        "SearchConfig.fidelity_subset", "choose a fraction in (0, 1]")
  check(source_of(d.name) is None, f"adaptive fidelity cannot cut task {d.name!r} (its "
        "requests are built by its source)", "SearchConfig.adaptive",
        "search it without adaptive fidelity")
  e = d.num_examples
  k = max(1, int(np.ceil(fraction * e)))
  rng = np.random.default_rng([seed, *map(ord, d.name)])
  idx = np.sort(rng.choice(e, size=k, replace=False))
  if kinds.REGISTRY[d.kind].on_host:  # the verifier reads the subset's own host examples
    task, rows = _HOST[(d.name, d.split, d.examples, d.vocab_key)]
    label = f"{d.split}[subset {fraction} seed {seed}]"
    _HOST[(d.name, label, k, d.vocab_key)] = (task, [rows[i] for i in idx])
    cut = {f: np.asarray(getattr(d, f))[idx]
           for f in ("tokens", "target_mask", "prompts", "prompt_lens")}
    return d.replace(split=label, examples=k, **cut)
  # Its own count too: scores are hits over num_examples (a kept count would shrink them).
  rows = jax.tree.map(lambda x: np.asarray(x)[idx], d.replace(packed=None, examples=k))
  return rows.replace(packed=pack(rows)) if d.packed else rows
