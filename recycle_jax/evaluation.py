"""Task splits materialized once into fixed-shape arrays, and jitted scorers.

A split becomes a `TaskData` pytree (static `kind`, fixed shapes), so one compiled
program can score any candidate, or a vmapped population, without leaving the device.
How each kind is materialized and scored is one `Kind` record in `KINDS`:

  choice:   rank classification by length-normalized log-likelihood of each choice (any
            number of choices per example).
  exact:    greedy decoding checked by exact match against the target (+EOS). Because
            decoding is greedy, "every teacher-forced argmax equals the target" is the
            same event; `generation='teacher_forced'` scores it with one forward pass.
  generate: greedy decoding on device (`decoding.generate`: KV cache, EOS and stop
            sequences); the tokens come back to the host, where the task's verifier
            (its seqio metric_fns, `scoring.score_texts`) scores them: `verify`.
A task's kind is `scoring.of(task)`. Scores are percentages in [0, 100].
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from recycle_jax import decoding, models, partitioning, scoring
from recycle_jax.errors import UserError, check

if TYPE_CHECKING:  # seqio imports TensorFlow: only reading a task does (get_task)
  import seqio

PyTree = Any


@flax.struct.dataclass
class TaskData:
  """One task split. E examples, C choices, L sequence length.

  exact:    tokens [E, L] = prompt + target + EOS (right-padded), target_mask [E, L]
            marks target tokens; prompts [E, Lp], prompt_lens [E]; targets [E, Lt],
            target_lens [E] (EOS included).
  generate: prompts [E', Lp], prompt_lens [E'] (E' >= E: `place` pads rows to split them
            over 'data'), stop_ids [S, Ls] (decoding.stop_ids), static max_new;
            tokens/target_mask are the prompts/zeros (unused). `split`, `examples` (E)
            and `vocab_key` find the host examples the verifier scores against.
  choice:   tokens [E, C, L], target_mask [E, C, L], labels [E], choice_count [E] (the
            example's real choices come first; the other slots are empty and never win).
  """
  tokens: jax.Array
  target_mask: jax.Array
  labels: jax.Array | None = None
  prompts: jax.Array | None = None
  prompt_lens: jax.Array | None = None
  targets: jax.Array | None = None
  target_lens: jax.Array | None = None
  choice_count: jax.Array | None = None
  stop_ids: jax.Array | None = None
  packed: tuple["Packed", ...] | None = None  # the scoring layout (`pack`), by materialize
  kind: str = flax.struct.field(pytree_node=False, default="exact")
  name: str = flax.struct.field(pytree_node=False, default="")
  split: str = flax.struct.field(pytree_node=False, default="")
  examples: int = flax.struct.field(pytree_node=False, default=0)  # E; 0: tokens' rows
  max_new: int = flax.struct.field(pytree_node=False, default=0)
  vocab_key: str = flax.struct.field(pytree_node=False, default="")  # materialize's key

  @property
  def num_examples(self) -> int:
    return self.examples or self.tokens.shape[0]


@flax.struct.dataclass
class Packed:
  """Rows of one length bucket of a split, laid out so one forward pass scores them.

  A row is one example. Generation: prompt + target, plain causal attention. Choice: the
  prompt once (segment 0), then every choice after it as its own segment (c + 1) that
  attends to the prompt and to itself only, with RoPE positions continuing from the
  prompt: each choice sees exactly the tokens and positions it has in its own padded row,
  so the prompt runs once instead of C times. Rows are trimmed to their bucket's length.
    tokens, positions, segments [R, L]
    slot_pos, slot_tok, slot_group [R, S]: a scored prediction: the hidden state at
        slot_pos predicts slot_tok, for choice slot_group (0 for generation; -1 = unused).
    labels [R]: the right choice (choice tasks; zeros otherwise).
  Only the S slots go through the head (no [R, L, V] logits).
  """
  tokens: jax.Array
  positions: jax.Array
  segments: jax.Array
  slot_pos: jax.Array
  slot_tok: jax.Array
  slot_group: jax.Array
  labels: jax.Array
  num_groups: int = flax.struct.field(pytree_node=False, default=1)
  kind: str = flax.struct.field(pytree_node=False, default="exact")


def _round_up(n: int, m: int = 8) -> int:
  return max(m, -(-n // m) * m)


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _sequences(prompts, conts) -> tuple[np.ndarray, np.ndarray]:
  seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
  length = _round_up(max(map(len, seqs)))
  mask = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, conts)]
  return _pad(seqs, length), _pad(mask, length).astype(bool)


def get_task(name: str) -> seqio.Task:
  import seqio
  from recycle_jax import tasks as _  # registers the embedded benchmark
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
  from recycle_jax import vocabularies
  task = get_task(name)
  if vocabulary is not None:
    return vocabularies.bind(task, vocabulary)
  check(not any(isinstance(v, vocabularies.PoolVocabulary)
                for v in vocabularies.declared(task).values()),
        f"task {name!r} is tokenized with the pool's vocabulary, and none was given",
        f"task {name!r}", "evaluate it on a pool (its tokenizer is read from the checkpoints)")
  return task


def split_examples(name: str, split: str, vocabulary: seqio.Vocabulary | None = None
                   ) -> list[dict]:
  """Tokenized examples (seqio preprocessing) as numpy dicts. `split` is the name the
  search uses ('dev', 'test'); a task declared with other split names maps it
  (`scoring.Scoring.splits`)."""
  task = bound_task(name, vocabulary)
  split = scoring.split_name(name, split)
  check(split in task.splits, f"task {name!r} has no split {split!r}", "--split",
        f"choose from: {', '.join(task.splits)} (or map 'dev'/'test' to them: "
        "scoring.Scoring.splits)")
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  return list(ds.as_numpy_iterator())


def task_vocabulary(task: seqio.Task) -> seqio.Vocabulary:
  """The vocabulary a task's targets (and choices) are tokenized with."""
  return task.output_features["targets"].vocabulary


def choice_data(name: str, prompts: Sequence[Sequence[int]],
                choices: Sequence[Sequence[Sequence[int]]], labels: Sequence[int]
                ) -> TaskData:
  """A choice split from token ids; examples may have different numbers of choices.

  Each example's choices are padded to the split's maximum C with empty slots
  (`choice_count` [E] says how many are real) that score -inf, so they never win.
  """
  counts = [len(cs) for cs in choices]
  for i, (n, y) in enumerate(zip(counts, labels)):
    check(n >= 1 and 0 <= y < n, f"example {i} has label {y} but {n} choices",
          f"task {name!r}", "labels index the example's own choices")
  c = max(counts)
  flat_p = [p for p, cs in zip(prompts, choices) for _ in cs]
  tokens, mask = _sequences(flat_p, [x for cs in choices for x in cs])
  e, l = len(prompts), tokens.shape[1]
  full_t, full_m = np.zeros((e, c, l), np.int32), np.zeros((e, c, l), bool)
  row = 0
  for i, n in enumerate(counts):
    full_t[i, :n], full_m[i, :n] = tokens[row:row + n], mask[row:row + n]
    row += n
  d = TaskData(tokens=full_t, target_mask=full_m, labels=np.asarray(labels, np.int32),
               choice_count=np.asarray(counts, np.int32), kind="choice", name=name)
  return d.replace(packed=pack(d))


def _choice(name: str, prompts: list, rows: list[dict], vocab: seqio.Vocabulary,
            how: scoring.Scoring) -> TaskData:
  choices = [[vocab.encode(c.decode()) for c in r["choices"]] for r in rows]
  return choice_data(name, prompts, choices, [int(r["label"]) for r in rows])


def _exact(name: str, prompts: list, rows: list[dict], vocab: seqio.Vocabulary,
           how: scoring.Scoring) -> TaskData:
  targets = [r["targets"].tolist() for r in rows]  # EOS appended by seqio
  tokens, mask = _sequences(prompts, targets)
  d = TaskData(tokens=tokens, target_mask=mask, kind="exact", name=name,
               prompts=_pad(prompts, _round_up(max(map(len, prompts)))),
               prompt_lens=np.array([len(p) for p in prompts], np.int32),
               targets=_pad(targets, max(map(len, targets))),
               target_lens=np.array([len(t) for t in targets], np.int32))
  return d.replace(packed=pack(d))


def _generate(name: str, prompts: list, rows: list[dict], vocab: seqio.Vocabulary,
              how: scoring.Scoring) -> TaskData:
  check(all(prompts), f"task {name!r} has an empty prompt", f"task {name!r}",
        "every example needs a prompt to continue")
  padded = _pad(prompts, _round_up(max(map(len, prompts))))
  return TaskData(tokens=padded, target_mask=np.zeros(padded.shape, bool), kind="generate",
                  name=name, prompts=padded,
                  prompt_lens=np.array([len(p) for p in prompts], np.int32),
                  stop_ids=decoding.stop_ids([vocab.encode(s) for s in how.stop],
                                             vocab.eos_id),
                  max_new=how.max_new_tokens)


_MATERIALIZED: dict = {}
# (name, split, E, vocabulary key) -> (bound task, its E examples): what `verify` reads.
_HOST: dict = {}


def materialize(name: str, split: str, max_examples: int | None = None,
                vocabulary: seqio.Vocabulary | None = None) -> TaskData:
  """Reads a seqio task split once, tokenized with `vocabulary` (the pool's; see
  `bound_task`), and pads it into fixed-shape arrays as its kind says (`KINDS`; cached
  per vocabulary content)."""
  from recycle_jax import vocabularies
  key = (name, split, max_examples,
         None if vocabulary is None else vocabularies.content_hash(vocabulary))
  if key not in _MATERIALIZED:
    _MATERIALIZED[key] = _materialize(name, split, max_examples, vocabulary, key[3] or "")
  return _MATERIALIZED[key]


def forget_splits() -> None:
  """Drops every materialized split (after the embedded benchmark's splits changed)."""
  _MATERIALIZED.clear()


def _materialize(name: str, split: str, max_examples: int | None,
                 vocabulary: seqio.Vocabulary | None, vocab_key: str) -> TaskData:
  task = bound_task(name, vocabulary)
  vocab = task_vocabulary(task)  # the prompts' vocabulary, never another
  rows = split_examples(name, split, vocabulary)[:max_examples]
  check(len(rows) > 0, f"task {name!r} split {split!r} is empty", "--split")
  bos = [vocab.bos_id] if getattr(vocab, "add_bos", False) else []  # as transformers does
  prompts = [(bos if list(r["inputs"][:1]) != bos else []) + r["inputs"].tolist()
             for r in rows]
  how = scoring.of(task, "choices" in rows[0])
  check(how.kind != "choice" or "choices" in rows[0],
        f"task {name!r} is declared 'choice' but its examples have no choices",
        f"task {name!r}", "give every example `choices` and `label`")
  d = KINDS[how.kind].materialize(name, prompts, rows, vocab, how)
  _HOST[(name, split, len(rows), vocab_key)] = (task, rows)
  return d.replace(split=split, examples=len(rows), vocab_key=vocab_key)


# ----------------------------------------------------------------------------- packing

def _pack_row(tokens: np.ndarray, mask: np.ndarray) -> tuple[list, list, list, list]:
  """One example's padded rows [C, L] (C = 1 for generation) -> packed (tokens, positions,
  segments, slots [(pos, tok, group)]). Segment 0 is the longest common prefix of the C
  rows' non-target parts; a target token at row index i is predicted by row index i - 1
  (never i = 0: nothing predicts it, as in the padded scorers)."""
  lens = [int(np.flatnonzero(m).max()) + 1 if m.any() else int(np.count_nonzero(t))
          for t, m in zip(tokens, mask)]
  heads = [int(np.argmax(m)) if m.any() else n for m, n in zip(mask, lens)]
  first = tokens[0]
  shared = min(heads)
  for t in tokens[1:]:
    diff = np.flatnonzero(t[:shared] != first[:shared])
    shared = int(diff[0]) if diff.size else shared
  toks, pos, seg = list(first[:shared]), list(range(shared)), [0] * shared
  slots = []
  for c, (t, m, n) in enumerate(zip(tokens, mask, lens)):
    start = len(toks)
    where = lambda j: j if j < shared else start + j - shared  # row index -> packed index
    toks += list(t[shared:n]); pos += list(range(shared, n)); seg += [c + 1] * (n - shared)
    slots += [(where(i - 1), int(t[i]), c) for i in np.flatnonzero(m[:n]) if i >= 1]
  if len(tokens) == 1:
    seg = [0] * len(seg)  # one continuation: plain causal attention
  return toks, pos, seg, slots


def _buckets(lengths: np.ndarray, max_buckets: int, overhead: int) -> list[int]:
  """Upper lengths (multiples of 8) of at most `max_buckets` buckets minimizing padded
  tokens + `overhead` per bucket (each bucket is one more set of kernels to run)."""
  sizes = sorted({_round_up(int(n)) for n in lengths})
  count = {l: int(np.sum([_round_up(int(n)) == l for n in lengths])) for l in sizes}
  below = np.cumsum([count[l] for l in sizes])  # rows with rounded length <= sizes[i]
  rows = lambda i, j: below[j] - (below[i - 1] if i > 0 else 0)  # rows in (sizes[i..j])
  best = {(-1, 0): (0.0, [])}  # (last index, buckets used) -> (cost, cuts)
  for j in range(len(sizes)):
    for k in range(1, max_buckets + 1):
      cands = [(c + rows(i + 1, j) * sizes[j] + overhead, cuts + [sizes[j]])
               for (i, kk), (c, cuts) in best.items() if kk == k - 1 and i < j]
      if cands:
        best[(j, k)] = min(cands, key=lambda x: x[0])
  last = len(sizes) - 1
  return min((v for (i, _), v in best.items() if i == last), key=lambda x: x[0])[1]


def pack(d: TaskData, max_buckets: int = 4, overhead: int = 128) -> tuple[Packed, ...]:
  """The scoring layout of a padded split (host numpy): examples packed one per row
  (`Packed`), sorted by length into at most `max_buckets` buckets, each trimmed to its
  longest row (rounded up to 8)."""
  tokens = np.asarray(d.tokens)
  mask = np.asarray(d.target_mask)
  if d.kind != "choice":
    tokens, mask = tokens[:, None], mask[:, None]
  counts = (np.asarray(d.choice_count) if d.choice_count is not None
            else np.full(len(tokens), tokens.shape[1]))
  rows = [_pack_row(t[:n], m[:n]) for t, m, n in zip(tokens, mask, counts)]
  labels = (np.asarray(d.labels, np.int32) if d.kind == "choice"
            else np.zeros(len(rows), np.int32))
  lengths = np.array([len(r[0]) for r in rows])
  out = []
  lo = 0
  for hi in _buckets(lengths, max_buckets, overhead):
    idx = [i for i, n in enumerate(lengths) if lo < _round_up(int(n)) <= hi]
    lo = hi
    if not idx:
      continue
    s = max(1, max(len(rows[i][3]) for i in idx))
    arr = lambda fill, n: np.full((len(idx), n), fill, np.int32)
    tok, pos, seg = arr(models.PAD_ID, hi), arr(0, hi), arr(-1, hi)
    spos, stok, sgrp = arr(0, s), arr(0, s), arr(-1, s)
    for r, i in enumerate(idx):
      t, p, g, slots = rows[i]
      tok[r, :len(t)], pos[r, :len(p)], seg[r, :len(g)] = t, p, g
      pos[r, len(p):] = np.arange(len(p), hi)  # pads: ordinary later positions
      for k, (a, b, c) in enumerate(slots):
        spos[r, k], stok[r, k], sgrp[r, k] = a, b, c
    out.append(Packed(tokens=tok, positions=pos, segments=seg, slot_pos=spos,
                      slot_tok=stok, slot_group=sgrp, labels=labels[idx],
                      num_groups=tokens.shape[1], kind=d.kind))
  return tuple(out)


def pad_rows(p: Packed, multiple: int) -> Packed:
  """The bucket with rows appended up to a multiple of `multiple`: pad tokens and no scored
  slot, so they add no hit (`packed_hits`) and the scores are unchanged."""
  rows = p.tokens.shape[0]
  extra = -rows % multiple
  if not extra:
    return p
  fill = {"tokens": models.PAD_ID, "segments": -1, "slot_group": -1}
  grow = lambda name, x: np.concatenate(  # noqa: E731
      [x, np.full((extra, *x.shape[1:]), fill.get(name, 0), x.dtype)])
  out = {k: grow(k, np.asarray(getattr(p, k))) for k in
         ("tokens", "positions", "segments", "slot_pos", "slot_tok", "slot_group", "labels")}
  out["positions"][rows:] = np.arange(p.tokens.shape[1])
  return p.replace(**out)


def place(datas: tuple[TaskData, ...], mesh) -> tuple[TaskData, ...]:
  """Splits placed on the mesh once, before the search: every packed bucket's rows split
  over the mesh's 'data' axis (padded to a multiple of it), so each data-parallel replica
  of the model scores its share of the examples instead of all of them; everything else
  replicated. Scores are unchanged (a pad row scores no hit)."""
  k = mesh.shape["data"]
  rows, full = NamedSharding(mesh, P("data")), partitioning.replicated(mesh)
  def one(d: TaskData) -> TaskData:
    packed = tuple(jax.tree.map(lambda x: partitioning.put(x, rows), pad_rows(p, k))
                   for p in d.packed or ())
    split = {}
    if d.kind == "generate":  # prompts over 'data', padded with empty (finished) prompts
      extra = -d.prompts.shape[0] % k
      split = {"prompts": np.pad(np.asarray(d.prompts), ((0, extra), (0, 0))),
               "prompt_lens": np.pad(np.asarray(d.prompt_lens), (0, extra),
                                     constant_values=0)}  # length 0: done at once
      split = {n: partitioning.put(x, rows) for n, x in split.items()}
    d = d.replace(packed=None, **{n: None for n in split})
    d = jax.tree.map(lambda x: partitioning.put(x, full), d)
    return d.replace(packed=packed or None, **split)
  return tuple(one(d) for d in datas)


def load_split(task_names: Sequence[str], split: str, max_examples: int | None = None,
               vocabulary: seqio.Vocabulary | None = None) -> tuple[TaskData, ...]:
  return tuple(materialize(t, split, max_examples, vocabulary) for t in task_names)


def subset(d: TaskData, fraction: float, seed: int) -> TaskData:
  """A host split cut to a fixed random subset of ceil(fraction * E) of its examples (at
  least one), in their original order and packed again: adaptive fidelity's first pass.
  The subset depends on the task's name and `seed` only, so it is the same in every
  generation and on resume."""
  check(0.0 < fraction <= 1.0, f"fidelity subset fraction {fraction}",
        "SearchConfig.fidelity_subset", "choose a fraction in (0, 1]")
  e = d.num_examples
  k = max(1, int(np.ceil(fraction * e)))
  rng = np.random.default_rng([seed, *map(ord, d.name)])
  idx = np.sort(rng.choice(e, size=k, replace=False))
  if KINDS[d.kind].on_host:  # the verifier reads the subset's own host examples
    task, rows = _HOST[(d.name, d.split, d.examples, d.vocab_key)]
    label = f"{d.split}[subset {fraction} seed {seed}]"
    _HOST[(d.name, label, k, d.vocab_key)] = (task, [rows[i] for i in idx])
    cut = {f: np.asarray(getattr(d, f))[idx]
           for f in ("tokens", "target_mask", "prompts", "prompt_lens")}
    return d.replace(split=label, examples=k, **cut)
  # Its own count too: scores are hits over num_examples (a kept count would shrink them).
  rows = jax.tree.map(lambda x: np.asarray(x)[idx], d.replace(packed=None, examples=k))
  return rows.replace(packed=pack(rows)) if d.packed else rows


# ----------------------------------------------------------------------------- scorers

def teacher_forced_exact_match(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where every target token is the argmax given the true prefix."""
  pred = jnp.argmax(apply(params, d.tokens)[:, :-1], axis=-1)
  ok = (pred == d.tokens[:, 1:]) | ~d.target_mask[:, 1:]
  return jnp.all(ok, axis=-1).astype(jnp.float32)


def greedy_exact_match(decode, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where greedy decoding reproduces target + EOS."""
  out = decode(params, d.prompts, d.prompt_lens, d.targets.shape[1])
  valid = jnp.arange(d.targets.shape[1])[None] < d.target_lens[:, None]
  return jnp.all((out == d.targets) | ~valid, axis=-1).astype(jnp.float32)


def choice_logprobs(apply, params, d: TaskData) -> jax.Array:
  """[E, C] length-normalized log-likelihood of each choice."""
  e, c, l = d.tokens.shape
  toks, mask = d.tokens.reshape(e * c, l), d.target_mask.reshape(e * c, l)
  lp = models.token_logprobs(apply(params, toks), toks)
  score = (jnp.sum(lp * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1)).reshape(e, c)
  if d.choice_count is None:
    return score
  return jnp.where(jnp.arange(c) < d.choice_count[:, None], score, -jnp.inf)


def rank_classification(apply, params, d: TaskData) -> jax.Array:
  """[E] 1.0 where the labelled choice has the highest normalized log-likelihood."""
  return (jnp.argmax(choice_logprobs(apply, params, d), -1) == d.labels).astype(jnp.float32)


def packed_hits(decoder: models.Decoder, params, p: Packed) -> jax.Array:
  """[R] hits of one packed bucket: teacher-forced exact match (num_groups == 1, the
  generation layout) or rank classification by length-normalized log-likelihood."""
  logits = decoder.apply_packed(params, p.tokens, p.positions, p.segments, p.slot_pos)
  used = p.slot_group >= 0
  real = jnp.any(used, axis=-1)  # rows with no scored slot are padding (`pad_rows`)
  if p.kind != "choice":
    ok = (jnp.argmax(logits, axis=-1) == p.slot_tok) | ~used
    return (jnp.all(ok, axis=-1) & real).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(logp, p.slot_tok[..., None], axis=-1)[..., 0]  # [R, S]
  member = (p.slot_group[..., None] == jnp.arange(p.num_groups)).astype(lp.dtype)
  count = jnp.sum(member, 1)  # [R, C]; 0 for an example's empty (padding) choice slots
  score = jnp.where(count > 0, jnp.einsum("rs,rsc->rc", lp, member)
                    / jnp.maximum(count, 1), -jnp.inf)
  return ((jnp.argmax(score, -1) == p.labels) & real).astype(jnp.float32)


def _packed_or(ctx: "_Context", params, d: TaskData, padded: Callable) -> jax.Array:
  """Hits of a split: from its packed layout when it has one, else `padded` rows."""
  if d.packed:
    return jnp.concatenate([ctx.chunked(functools.partial(packed_hits, ctx.decoder), params,
                                        p, p.tokens.shape[0]) for p in d.packed])
  return ctx.chunked(padded, params, d.replace(packed=None), d.num_examples)


def _choice_hits(ctx: "_Context", params, d: TaskData) -> jax.Array:
  return _packed_or(ctx, params, d, functools.partial(rank_classification, ctx.decoder.apply))


def _exact_hits(ctx: "_Context", params, d: TaskData) -> jax.Array:
  if ctx.generation == "teacher_forced":
    return _packed_or(ctx, params, d,
                      functools.partial(teacher_forced_exact_match, ctx.decoder.apply))
  decode = (ctx.decoder.greedy_decode if ctx.generation == "greedy" else
            functools.partial(models.greedy_decode_uncached, ctx.decoder.apply))
  return ctx.chunked(functools.partial(greedy_exact_match, decode), params,
                     d.replace(packed=None), d.num_examples)


def _generate_tokens(ctx: "_Context", params, d: TaskData) -> jax.Array:
  return decoding.generate(ctx.decoder, params, decoding.Prompts(
      d.prompts, d.prompt_lens, d.stop_ids, d.max_new))


@dataclasses.dataclass(frozen=True)
class Kind:
  """A scoring kind. materialize(name, prompts [E token lists], rows [E seqio examples],
  vocabulary, scoring) -> TaskData (host).
  device(ctx, params, d) -> hits [R] whose sum over the split's E examples is its score
  (`on_host` False), or tokens [E', max_new] that the host's verifier scores (`verify`)."""
  name: str
  materialize: Callable[..., TaskData]
  device: Callable[..., jax.Array]
  on_host: bool


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("choice", _choice, _choice_hits, on_host=False),
    Kind("exact", _exact, _exact_hits, on_host=False),
    Kind("generate", _generate, _generate_tokens, on_host=True),
)}


def on_host(datas: Sequence[TaskData]) -> bool:
  """Whether some split's score is finished on the host (`finish`)."""
  return any(isinstance(d, TaskData) and KINDS[d.kind].on_host for d in datas)


@dataclasses.dataclass(frozen=True)
class _Context:
  decoder: models.Decoder
  generation: str
  batch_size: int

  def chunked(self, fn, params, tree, rows: int) -> jax.Array:
    """fn(params, tree) -> [rows] hits, in lax.map chunks of batch_size rows."""
    b = self.batch_size
    if b <= 0 or rows <= b:
      return fn(params, tree)
    n = -(-rows // b) * b
    padded = jax.tree.map(lambda x: jnp.pad(x, [(0, n - rows)] + [(0, 0)] * (x.ndim - 1)),
                          tree)
    chunks = jax.tree.map(lambda x: x.reshape(n // b, b, *x.shape[1:]), padded)
    return jax.lax.map(lambda c: fn(params, c), chunks).reshape(n)[:rows]


@functools.lru_cache(None)
def make_scorer(decoder: models.Decoder, generation: str = "teacher_forced",
                batch_size: int = 0) -> Callable:
  """`score(params, datas)`, pure and jittable: [T] percentages, or, when a split is
  scored on the host (`on_host`), ([T] with NaN at those splits, (tokens [E', max_new]
  of each such split, in order)), which `finish` completes.

  generation: how `exact` splits are scored: 'teacher_forced' (one forward; same result
  as greedy), 'greedy' (KV-cache decoding) or 'greedy_uncached' (any apply fn).
  batch_size > 0 evaluates examples in chunks with lax.map to bound activation memory.

  Splits from `materialize` carry a packed layout (`Packed`: length buckets, a choice
  task's prompt run once for all its choices, the head only where a prediction is
  scored); it gives the same hits as the padded scorers above, which are used for
  TaskData built without one and for greedy decoding.
  """
  check(generation in ("teacher_forced", "greedy", "greedy_uncached"),
        f"unknown generation scoring {generation!r}", "make_scorer.generation",
        "use teacher_forced, greedy or greedy_uncached")
  ctx = _Context(decoder, generation, batch_size)

  def score(params, datas: tuple[TaskData, ...]):
    scores, tokens = [], []
    for d in datas:
      out = KINDS[d.kind].device(ctx, params, d)
      if KINDS[d.kind].on_host:
        tokens.append(out)
        scores.append(jnp.float32(jnp.nan))
      else:
        scores.append(100.0 * jnp.sum(out) / d.num_examples)
    return (jnp.stack(scores), tuple(tokens)) if tokens else jnp.stack(scores)

  return score


# ----------------------------------------------------------------------------- on the host

def verify(d: TaskData, tokens: np.ndarray) -> np.ndarray:
  """[K] scores of K candidates' continuations tokens [K, E', T] of a `generate` split,
  each decoded with the task's vocabulary and scored by its verifier
  (`scoring.score_texts`)."""
  task, rows = _HOST[(d.name, d.split, d.examples, d.vocab_key)]
  vocab = task_vocabulary(task)
  tokens = np.asarray(tokens)[:, :d.examples]
  return np.array([scoring.score_texts(task, rows, decoding.texts(vocab, t)) for t in tokens],
                  np.float32)


_VERIFIER_THREADS = concurrent.futures.ThreadPoolExecutor(2, "verify")


def finish(scores: np.ndarray, tokens: Sequence[np.ndarray],
           datas: Sequence[TaskData]) -> np.ndarray:
  """scores [K, T] with the host-scored splits' columns filled from their tokens
  (`make_scorer`'s outputs, with a leading candidate axis K)."""
  scores = np.array(scores, np.float32)
  cols = [i for i, d in enumerate(datas) if KINDS[d.kind].on_host]
  for i, t in zip(cols, tokens):
    scores[:, i] = verify(datas[i], t)
  return scores


def evaluate(score: Callable, params, datas: Sequence[TaskData]) -> np.ndarray:
  """[T] scores of one model: `score` (a jitted `make_scorer`) on device, then `finish`."""
  out = jax.device_get(score(params, tuple(datas)))
  if not on_host(datas):
    return np.asarray(out, np.float32)
  scores, tokens = out
  return finish(scores[None], [t[None] for t in tokens], datas)[0]


def finish_async(out, datas: Sequence[TaskData]) -> concurrent.futures.Future:
  """`finish` of a population program's device outputs (scores, finite, tokens) on a
  verifier thread: the caller dispatches the next program meanwhile. The future gives
  (scores [K, T], finite [K]) on the host."""
  def run():
    scores, finite, tokens = jax.device_get(out)
    return finish(scores, tokens, datas), finite
  return _VERIFIER_THREADS.submit(run)
