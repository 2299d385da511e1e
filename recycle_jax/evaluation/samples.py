"""Per-item records in lm-eval's samples format (`--log_samples`: DIR/samples_TASK.jsonl),
one writer for every task: lm-eval's own tasks (`tasks.harness` builds their records with
lm-eval) and the built-in kinds (`built_in`, here, without lm-eval).

A record is what lm-eval 0.4.13's `evaluator.evaluate` logs per document and filter:
  doc_id, doc, target, arguments (per request: (context, continuation) for a
  log-likelihood, (context, generation settings) for a generation), resps (the raw
  answers: (log-likelihood, is_greedy) or the generated text), filtered_resps, filter,
  metrics (the metric names), doc_hash, prompt_hash, target_hash (sha256), and each
  metric's value for the document;
and `jsonl` writes them as its EvaluationTracker does (arguments as gen_args_I/arg_J,
responses as strings, target as a string).

The built-in kinds, under lm-eval's metric names:
  choice    one request per choice; acc, acc_norm, acc_bytes (lm-eval's) and
            acc_mean_token (no lm-eval metric), each the argmax of the summed
            log-likelihoods divided as `task_data.choice_norms` says (float32, as on
            device; ties to the first choice). target: the label's index.
  exact     one request; is_greedy as lm-eval's loglikelihood metrics `acc` (and
            `perplexity`, the log-likelihood, as lm-eval logs it); is_greedy_eos as
            itself (no lm-eval metric; the continuation then EOS).
  generate  the decoded text (resps) cut at the stop sequences and post-processed as the
            verifier reads it (filtered_resps), then the verifier's per-item values; the
            `numeric` verifier's metrics are lm-eval gsm8k's `exact_match` under the
            filters `strict-match` and `flexible-extract` (one record per filter, as
            lm-eval logs it, filtered_resps the extracted answer).
A task's score is 100 x the mean of its metric over the records (`aggregate`, `score_key`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from recycle_jax.evaluation import loglikelihood, scoring, task_data
from recycle_jax.evaluation.task_data import TaskData
from recycle_jax.evaluation.verifiers import Verifier, numeric
from recycle_jax.models import decoding
from recycle_jax.runtime.errors import check

NO_FILTER = "none"  # lm-eval's name for no filter
# A verifier's metrics that lm-eval logs as one metric under several filters:
# {verifier: {metric: (lm-eval metric, filter, the filter on the response)}}.
FILTERED: dict[str, dict[str, tuple[str, str, Callable[[str], str]]]] = {
    "numeric": {"strict-match": ("exact_match", "strict-match", numeric.strict_match),
                "flexible-extract": ("exact_match", "flexible-extract",
                                     numeric.flexible_extract)}}
# lm-eval's names of the exact kind's metrics (`scoring.KIND_METRICS`).
EXACT_NAMES = {"is_greedy": "acc", "is_greedy_eos": "is_greedy_eos"}
# Aggregations that are not the mean (lm-eval's `perplexity`: exp of minus the mean).
_AGGREGATE = {"perplexity": lambda v: math.exp(-float(np.mean(v)))}


# ----------------------------------------------------------------------------- lm-eval's format

def hash_string(text: str) -> str:
  """lm-eval's utils.hash_string."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def jsonable(o) -> Any:
  """lm-eval's utils.handle_non_serializable (json.dumps' default)."""
  if isinstance(o, np.bool_):
    return bool(o)
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, set):
    return list(o)
  return str(o)


def as_strings(x):
  """lm-eval's utils.sanitize_list: nested lists and tuples with every leaf a string."""
  if isinstance(x, list):
    return [as_strings(i) for i in x]
  if isinstance(x, tuple):
    return tuple(as_strings(i) for i in x)
  return str(x)


def record(doc_id: int, doc, target, arguments: Sequence[tuple], resps: Sequence[list],
           filtered_resps: Sequence, filt: str, metrics: dict) -> dict:
  """One document's record under one filter, as lm-eval's evaluator logs it."""
  return {"doc_id": doc_id, "doc": doc, "target": target,
          "arguments": [tuple(a) for a in arguments], "resps": list(resps),
          "filtered_resps": list(filtered_resps), "filter": filt, "metrics": list(metrics),
          "doc_hash": hash_string(json.dumps(doc, indent=2, default=jsonable,
                                             ensure_ascii=False)),
          "prompt_hash": hash_string(arguments[0][0]),
          "target_hash": hash_string(str(target)), **metrics}


def _written(sample: dict) -> dict:
  """A record as lm-eval's EvaluationTracker writes it to samples_TASK.jsonl."""
  s = dict(sample)
  s["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                    for i, arg in enumerate(sample["arguments"])}
  s["resps"] = as_strings(sample["resps"])
  s["filtered_resps"] = as_strings(sample["filtered_resps"])
  s["target"] = str(sample["target"])
  return s


def jsonl(samples: Sequence[dict]) -> str:
  """Records as lines of samples_TASK.jsonl."""
  return "".join(json.dumps(_written(s), default=jsonable, ensure_ascii=False) + "\n"
                 for s in samples)


def write(folder: str, samples: dict[str, list], overwrite: bool = False) -> None:
  """`folder`/samples_STEM.jsonl per entry {STEM: records}, written whole or not at all."""
  from recycle_jax.runtime import outputs
  for stem in samples:
    check(stem and os.sep not in stem and stem not in (".", ".."),
          f"task {stem!r} cannot name a samples file", "--log_samples",
          "name tasks without path separators")
  with outputs.staged(folder, overwrite) as tmp:
    os.makedirs(tmp)
    for stem, logged in samples.items():
      with open(os.path.join(tmp, f"samples_{stem}.jsonl"), "w", encoding="utf-8") as f:
        f.write(jsonl(logged))


def aggregate(samples: Sequence[dict]) -> dict[str, float]:
  """{'metric,filter': value} of records: the mean over documents (a list value, e.g.
  IFEval's instruction-level verdicts, counts each element), exp(-mean) for perplexity."""
  values: dict[tuple[str, str], list] = {}
  for s in samples:
    for m in s["metrics"]:
      v = s[m]
      values.setdefault((m, s["filter"]), []).extend(v if isinstance(v, list) else [v])
  return {f"{m},{f}": float(_AGGREGATE.get(m, np.mean)(v)) if v else 0.0
          for (m, f), v in values.items()}


def score_key(task, kind: str, metric: str) -> str:
  """The 'metric,filter' of the records whose mean x 100 is a built-in task's score
  (`task`: its seqio Task, for a generate task's verifier; `metric`: its score metric,
  '' for the verifier's first)."""
  if kind == "exact":
    return f"{EXACT_NAMES[metric]},{NO_FILTER}"
  if kind == "generate":
    fn = task.metric_fns[0]
    metric = metric or (fn.metrics[0] if isinstance(fn, Verifier) else "")
    named = FILTERED.get(getattr(fn, "name", ""), {}).get(metric)
    if named:
      return f"{named[0]},{named[1]}"
  return f"{metric},{NO_FILTER}"


# ----------------------------------------------------------------------------- built-in kinds

def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def document(row: dict) -> dict:
  """A seqio example as a JSON document: texts decoded; the token ids of a feature whose
  text is there too (`inputs` beside `inputs_pretokenized`) left out."""
  def plain(v):
    if isinstance(v, bytes):
      return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
      return [plain(x) for x in v.tolist()] if v.ndim else plain(v.item())
    if isinstance(v, list):
      return [plain(x) for x in v]
    if isinstance(v, np.generic):
      return v.item()
    return v
  return {k: plain(v) for k, v in row.items() if f"{k}_pretokenized" not in row}


def _local(x) -> np.ndarray:
  """A split's array on this host (a placed split's arrays are replicated: every process
  holds all of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


@functools.lru_cache(None)
def _loglikelihood_program(decoder) -> Callable:
  return jax.jit(functools.partial(loglikelihood.packed_loglikelihood, decoder))


def loglikelihoods(decoder, params, d: TaskData) -> tuple[np.ndarray, ...]:
  """(summed log-prob, is_greedy, token count), each [E, C] (C = 1 for exact), of every
  continuation of a choice or exact split: `loglikelihood.packed_loglikelihood` over the
  split packed as its scorer packs it, with each row's index as its label."""
  e = d.num_examples
  host = jax.tree.map(_local, d.replace(packed=None))
  c = host.tokens.shape[1] if d.kind == "choice" else 1
  summed = np.full((e, c), -np.inf, np.float32)
  greedy, count = np.zeros((e, c), bool), np.zeros((e, c), np.int32)
  for p in task_data.pack(host, labels=np.arange(e, dtype=np.int32)):
    s, g, n = jax.device_get(_loglikelihood_program(decoder)(params, p))
    rows = np.asarray(p.labels)
    summed[rows], greedy[rows], count[rows] = s, g, n
  return summed, greedy, count


def _choice(rows, how: scoring.Scoring, summed, greedy, count) -> list[dict]:
  out = []
  for i, r in enumerate(rows):
    texts = [_text(c) for c in r["choices"]]
    n, context = len(texts), _text(r["inputs_pretokenized"])
    lls = summed[i, :n]
    metrics = {}
    for m in scoring.KIND_METRICS["choice"]:
      norm = np.asarray(task_data.choice_norms(m, texts, [[0] * int(k) for k in count[i, :n]]),
                        np.float32)
      metrics[m] = float(int(np.argmax(lls / norm)) == int(r["label"]))
    answers = [(float(lls[j]), bool(greedy[i, j])) for j in range(n)]
    out.append(record(i, document(r), int(r["label"]),
                      [(context, how.target_delimiter + t) for t in texts],
                      [[a] for a in answers], answers, NO_FILTER, metrics))
  return out


def _exact(rows, how: scoring.Scoring, summed, greedy) -> list[dict]:
  out = []
  for i, r in enumerate(rows):
    target = _text(r["targets_pretokenized"])
    answer = (float(summed[i, 0]), bool(greedy[i, 0]))
    metric = EXACT_NAMES[how.score_metric]
    metrics = ({"perplexity": answer[0], metric: float(answer[1])}
               if how.score_metric == "is_greedy" else {metric: float(answer[1])})
    out.append(record(i, document(r), target,
                      [(_text(r["inputs_pretokenized"]), how.target_delimiter + target)],
                      [[answer]], [answer], NO_FILTER, metrics))
  return out


def _per_item(fn, targets: list, preds: list) -> list[dict]:
  """Each example's metric values ({metric: value in [0, 1] or a list of them}): a
  verifier's hits (one call when every metric has one value per example, else one per
  example, as IFEval's instruction-level lists), or a plain seqio metric on the example
  alone (its percentage / 100)."""
  e = len(preds)
  if isinstance(fn, Verifier):
    hits = fn.hits(targets, preds)
    if all(len(v) == e for v in hits.values()):
      return [{k: float(v[i]) for k, v in hits.items()} for i in range(e)]
    one = lambda i: {k: [float(x) for x in v] if len(v) != 1 else float(v[0])  # noqa: E731
                     for k, v in fn.hits([targets[i]], [preds[i]]).items()}
    return [one(i) for i in range(e)]
  return [{k: float(v) / 100.0 for k, v in fn([t], [p]).items()}
          for t, p in zip(targets, preds)]


def _generate(task, rows, how: scoring.Scoring, texts: list[str]) -> list[dict]:
  post = task.postprocess_fn or (lambda x, example=None, is_target=False: x)
  raw = [_text(r["targets_pretokenized"]) for r in rows]
  targets = [post(t, example=r, is_target=True) for t, r in zip(raw, rows)]
  preds = [post(scoring.truncate(t, how.stop), example=r, is_target=False)
           for t, r in zip(texts, rows)]
  fn = task.metric_fns[0]
  values = _per_item(fn, targets, preds)
  settings = {"until": list(how.stop), "max_gen_toks": how.max_new_tokens,
              "do_sample": False}
  filtered = FILTERED.get(getattr(fn, "name", ""), {})
  out = []
  for f in [NO_FILTER] + sorted({f for _, f, _ in filtered.values()}):
    for i, r in enumerate(rows):
      if f == NO_FILTER:
        metrics = {k: v for k, v in values[i].items() if k not in filtered}
        response = preds[i]
      else:
        named = [(m, k, pick) for k, (m, ff, pick) in filtered.items() if ff == f]
        metrics = {m: values[i][k] for m, k, _ in named}
        response = named[0][2](preds[i])
      if metrics:
        out.append(record(i, document(r), raw[i],
                          [(_text(r["inputs_pretokenized"]), settings)], [[texts[i]]],
                          [response], f, metrics))
  return out


def built_in(decoder, params, d: TaskData, tokens: np.ndarray | None = None) -> list[dict]:
  """The records of one model on a built-in split `d` (a seqio task's: choice, exact or
  generate). tokens: a generate split's decoded continuations [E', T], as the scorer
  returned them (its verifier scored these); the log-likelihoods of a choice or exact
  split are computed here (`loglikelihoods`)."""
  from recycle_jax.evaluation import task_splits
  task, rows = task_splits._HOST[(d.name, d.split, d.examples, d.vocab_key)]  # as read
  how = scoring.of(task, d.kind == "choice")
  if d.kind == "generate":
    check(tokens is not None, f"task {d.name!r}: no generated tokens to log",
          "samples.built_in", "pass the scorer's tokens of the split")
    vocab = task_splits.task_vocabulary(task)
    return _generate(task, rows, how, decoding.texts(vocab, np.asarray(tokens)[:d.examples]))
  summed, greedy, count = loglikelihoods(decoder, params, d)
  if d.kind == "choice":
    return _choice(rows, how, summed, greedy, count)
  return _exact(rows, how, summed, greedy)
