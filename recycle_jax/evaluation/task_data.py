"""Task splits as fixed-shape arrays: a split is a `TaskData` pytree (static `kind`, fixed
shapes), so one compiled program scores any candidate, or a vmapped population, without
leaving the device. Holds each kind's materializer (token lists -> TaskData), the packed
scoring layout (`pack`), placement on the mesh and the context check. What each kind
means: `kinds`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import flax.struct
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from recycle_jax.models import decoding, transformer, partitioning
from recycle_jax.evaluation import scoring
from recycle_jax.runtime.errors import check

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
            over 'data'), stop_ids [S, Ls] (decoding.stop_ids: EOS and the stops' ids),
            stop_text [S', 1 + M, V] (decoding.stop_tables: the stops as text), static
            max_new and decode_groups (rows in that many blocks, one per 'data' shard);
            tokens/target_mask are the prompts/zeros (unused). `split`, `examples` (E)
            and `vocab_key` find the host examples the verifier scores against.
  choice:   tokens [E, C, L], target_mask [E, C, L], labels [E], choice_count [E] (the
            example's real choices come first; the other slots are empty and never win),
            choice_norm [E, C]: what each choice's summed log-likelihood is divided by
            before the argmax (1 for acc; characters, bytes or tokens otherwise).
  """
  tokens: jax.Array
  target_mask: jax.Array
  labels: jax.Array | None = None
  prompts: jax.Array | None = None
  prompt_lens: jax.Array | None = None
  targets: jax.Array | None = None
  target_lens: jax.Array | None = None
  choice_count: jax.Array | None = None
  choice_norm: jax.Array | None = None
  stop_ids: jax.Array | None = None
  stop_text: jax.Array | None = None
  packed: tuple["Packed", ...] | None = None  # the scoring layout (`pack`), by materialize
  kind: str = flax.struct.field(pytree_node=False, default="exact")
  name: str = flax.struct.field(pytree_node=False, default="")
  split: str = flax.struct.field(pytree_node=False, default="")
  examples: int = flax.struct.field(pytree_node=False, default=0)  # E; 0: tokens' rows
  max_new: int = flax.struct.field(pytree_node=False, default=0)
  decode_groups: int = flax.struct.field(pytree_node=False, default=1)
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
    group_norm [R, C]: each choice's divisor (`TaskData.choice_norm`; ones otherwise).
  Only the S slots go through the head (no [R, L, V] logits).
  """
  tokens: jax.Array
  positions: jax.Array
  segments: jax.Array
  slot_pos: jax.Array
  slot_tok: jax.Array
  slot_group: jax.Array
  labels: jax.Array
  group_norm: jax.Array
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


def choice_data(name: str, prompts: Sequence[Sequence[int]],
                choices: Sequence[Sequence[Sequence[int]]], labels: Sequence[int],
                norms: Sequence[Sequence[float]] | None = None) -> TaskData:
  """A choice split from token ids; examples may have different numbers of choices.

  Each example's choices are padded to the split's maximum C with empty slots
  (`choice_count` [E] says how many are real) that score -inf, so they never win.
  norms: per example, each choice's divisor (default 1: summed log-likelihood, acc).
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
  full_n = np.ones((e, c), np.float32)
  row = 0
  for i, n in enumerate(counts):
    full_t[i, :n], full_m[i, :n] = tokens[row:row + n], mask[row:row + n]
    if norms is not None:
      check(len(norms[i]) == n and all(x > 0 for x in norms[i]),
            f"example {i} has norms {list(norms[i])} for {n} choices", f"task {name!r}",
            "give one positive divisor per choice")
      full_n[i, :n] = norms[i]
    row += n
  d = TaskData(tokens=full_t, target_mask=full_m, labels=np.asarray(labels, np.int32),
               choice_count=np.asarray(counts, np.int32), choice_norm=full_n,
               kind="choice", name=name)
  return d.replace(packed=pack(d))


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def bos_prefix(vocab: seqio.Vocabulary) -> list[int]:
  """[BOS] where the tokenizer starts a sequence with it (as transformers does), else []."""
  return [vocab.bos_id] if getattr(vocab, "add_bos", False) else []


def loglikelihood_pairs(rows: list[dict], vocab: seqio.Vocabulary, how: scoring.Scoring,
                        continuations: Sequence[Sequence[str]]
                        ) -> tuple[list[list[int]], list[list[list[int]]]]:
  """Per example, the context ids and each continuation's ids as lm-eval encodes the
  requests (context = the prompt text, continuation = target_delimiter + text;
  `scoring.encode_pair`). An empty context starts from BOS or, without one, from EOS
  (lm-eval's prefix token), so the first continuation token is scored too."""
  contexts, conts = [], []
  for r, texts in zip(rows, continuations):
    context = _text(r["inputs_pretokenized"])
    pairs = [scoring.encode_pair(vocab.encode, context, how.target_delimiter + t)
             for t in texts]
    head = bos_prefix(vocab) + pairs[0][0]
    contexts.append(head or [vocab.eos_id])
    conts.append([c for _, c in pairs])
  return contexts, conts


def choice_norms(metric: str, texts: Sequence[str], tokens: Sequence[Sequence[int]]
                 ) -> list[float]:
  """Each choice's divisor for `metric`: lm-eval divides by the choice's characters
  (acc_norm) or UTF-8 bytes (acc_bytes), the delimiter not counted."""
  if metric == "acc_norm":
    return [float(len(t)) for t in texts]
  if metric == "acc_bytes":
    return [float(len(t.encode("utf-8"))) for t in texts]
  if metric == "acc_mean_token":
    return [float(max(len(c), 1)) for c in tokens]
  return [1.0] * len(texts)


def _choice(name: str, prompts: list, rows: list[dict], vocab: seqio.Vocabulary,
            how: scoring.Scoring) -> TaskData:
  texts = [[_text(c) for c in r["choices"]] for r in rows]
  contexts, choices = loglikelihood_pairs(rows, vocab, how, texts)
  for i, (t, cs) in enumerate(zip(texts, choices)):
    check(all(t) and all(cs), f"example {i} of task {name!r} has an empty choice",
          f"task {name!r}", "every choice needs text (lm-eval divides by its length)")
  norms = [choice_norms(how.score_metric, t, cs) for t, cs in zip(texts, choices)]
  return choice_data(name, contexts, choices, [int(r["label"]) for r in rows], norms)


def _exact(name: str, prompts: list, rows: list[dict], vocab: seqio.Vocabulary,
           how: scoring.Scoring) -> TaskData:
  prompts, conts = loglikelihood_pairs(rows, vocab, how,
                                       [[_text(r["targets_pretokenized"])] for r in rows])
  eos = [vocab.eos_id] if how.score_metric == "is_greedy_eos" else []
  targets = [c[0] + eos for c in conts]
  check(all(targets), f"task {name!r} has an empty target", f"task {name!r}",
        "every example needs a target to match")
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
                  stop_text=decoding.stop_tables(vocab, tuple(how.stop)),
                  max_new=how.max_new_tokens)


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


def pack(d: TaskData, max_buckets: int = 4, overhead: int = 128,
         labels: np.ndarray | None = None) -> tuple[Packed, ...]:
  """The scoring layout of a padded split (host numpy): examples packed one per row
  (`Packed`), sorted by length into at most `max_buckets` buckets, each trimmed to its
  longest row (rounded up to 8). labels [E]: what each row's `labels` holds (default the
  right choice, or zeros; `samples.loglikelihoods` passes the rows' indices)."""
  tokens = np.asarray(d.tokens)
  mask = np.asarray(d.target_mask)
  if d.kind != "choice":
    tokens, mask = tokens[:, None], mask[:, None]
  counts = (np.asarray(d.choice_count) if d.choice_count is not None
            else np.full(len(tokens), tokens.shape[1]))
  rows = [_pack_row(t[:n], m[:n]) for t, m, n in zip(tokens, mask, counts)]
  if labels is None:
    labels = (np.asarray(d.labels, np.int32) if d.kind == "choice"
              else np.zeros(len(rows), np.int32))
  labels = np.asarray(labels, np.int32)
  norms = (np.asarray(d.choice_norm, np.float32) if d.choice_norm is not None
           else np.ones(tokens.shape[:2], np.float32))
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
    tok, pos, seg = arr(transformer.PAD_ID, hi), arr(0, hi), arr(-1, hi)
    spos, stok, sgrp = arr(0, s), arr(0, s), arr(-1, s)
    for r, i in enumerate(idx):
      t, p, g, slots = rows[i]
      tok[r, :len(t)], pos[r, :len(p)], seg[r, :len(g)] = t, p, g
      pos[r, len(p):] = np.arange(len(p), hi)  # pads: ordinary later positions
      for k, (a, b, c) in enumerate(slots):
        spos[r, k], stok[r, k], sgrp[r, k] = a, b, c
    out.append(Packed(tokens=tok, positions=pos, segments=seg, slot_pos=spos,
                      slot_tok=stok, slot_group=sgrp, labels=labels[idx],
                      group_norm=norms[idx], num_groups=tokens.shape[1], kind=d.kind))
  return tuple(out)


def pad_rows(p: Packed, multiple: int) -> Packed:
  """The bucket with rows appended up to a multiple of `multiple`: pad tokens and no scored
  slot, so they add no hit (`packed_hits`) and the scores are unchanged."""
  rows = p.tokens.shape[0]
  extra = -rows % multiple
  if not extra:
    return p
  fill = {"tokens": transformer.PAD_ID, "segments": -1, "slot_group": -1, "group_norm": 1}
  grow = lambda name, x: np.concatenate(  # noqa: E731
      [x, np.full((extra, *x.shape[1:]), fill.get(name, 0), x.dtype)])
  out = {k: grow(k, np.asarray(getattr(p, k))) for k in
         ("tokens", "positions", "segments", "slot_pos", "slot_tok", "slot_group", "labels",
          "group_norm")}
  out["positions"][rows:] = np.arange(p.tokens.shape[1])
  return p.replace(**out)


def longest_row(d: TaskData) -> int:
  """The most tokens a split asks the model to read at once: prompt + scored continuation
  (choice, exact), or prompt + max_new generated tokens (generate); 0 for other kinds."""
  if d.kind == "generate":
    return int(np.max(np.asarray(d.prompt_lens), initial=0)) + int(d.max_new)
  if d.kind not in ("choice", "exact"):
    return 0
  mask = np.asarray(d.target_mask)
  last = np.where(mask.any(-1), mask.shape[-1] - np.argmax(mask[..., ::-1], -1), 0)
  return int(np.max(last, initial=0))


def check_context(datas: Sequence[TaskData], context: int, where: str) -> None:
  """Refuses a split with a sequence longer than the model's context: a prompt is never
  cut (transformers and lm-eval would drop its start without a word)."""
  for d in datas:
    n = longest_row(d)
    check(n <= context, f"task {d.name!r} ({d.split or 'split'}) needs {n} tokens in one "
          f"sequence, more than the model's context of {context}", where,
          "shorten its prompts (few-shot examples, templates), lower max_new_tokens, or "
          "leave the task out; recycle_jax never cuts a prompt")


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
      d = d.replace(decode_groups=k)  # decoding moves rows within a shard only
    d = d.replace(packed=None, **{n: None for n in split})
    d = jax.tree.map(lambda x: partitioning.put(x, full), d)
    return d.replace(packed=packed or None, **split)
  return tuple(one(d) for d in datas)


