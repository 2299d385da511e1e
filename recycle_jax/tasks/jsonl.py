"""Tasks users bring without editing recycle_jax: JSONL files described in gin, and modules.

A `JsonlTask` (gin-configurable record) becomes a seqio Task over JSON-lines files:

  splits        {split: file or glob}. The search scores 'dev' and reports 'test'; name
                any other file 'dev'/'test' here (e.g. {'dev': 'validation.jsonl'}).
  prompt        template over the record's fields: 'Q: {question}\\nA: '. A template that
                is one placeholder alone ('{kwargs}') gives the field's JSON value as is.
  fields        {template name: JSON key} for fields named differently in the files.
  kind          'choice' (choices + label), 'exact' (teacher-forced exact match of
                `target`), 'generate' (greedy decoding scored by `verifier`).
  target        template (or {key: template}) of what is scored: the answer text
                ('exact', and text verifiers), or the verifier's target (code tests,
                IFEval records).
  answer        template of a correct answer's text, shown in few-shot examples
                (default: `target` when it is text).
  choices, label  field names: the list of choices, and the right one's index or text.
  verifier      a name in `verifiers.REGISTRY` ('generate' only; default exact_match).
  verifier_options  the verifier's keyword options, lm-eval's metric kwargs (exact_match:
                ignore_case, ignore_punctuation, regexes_to_ignore).
  metric        the metric that is the task's score (`scoring.Scoring.metric`): choice:
                acc (default), acc_norm, acc_bytes, acc_mean_token; exact: is_greedy
                (default), is_greedy_eos; generate: one of the verifier's metrics.
  target_delimiter  lm-eval's: put between prompt and answer for choice and exact
                (default " "; the prompt's trailing whitespace moves into the answer).
  id            the field that names a record (HumanEval's task_id) for `verify`.
  few_shot      k examples drawn once (`seed`) from `few_shot_split`, each prompt + answer,
                joined by `separator` before every prompt.
  chat_template apply the vocabulary's chat template to the prompt (`chat_template_fn`).
  max_new_tokens, stop  how generation decodes ('generate' only).

Registration checks the description and every split's first line (a template over an
unknown field, a verifier given to a kind that cannot use it, a missing file); a split's
lines are read and checked when the split is read, before anything is computed on
it (a malformed JSON line or a field absent from a line, named with the file and line
number). `max_examples` reads only the lines it needs (`task_splits.read_limit`).

`import_modules(['my.tasks'])` imports Python modules that register their own seqio Tasks,
finding them in the working directory too (`--task_module`).
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import random
import string
import sys
from typing import Any, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from recycle_jax.evaluation import scoring, task_splits, verifiers, vocabularies
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.tasks.spec import JsonlTask

Record = dict[str, Any]


def _placeholders(template: str) -> list[str]:
  try:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise UserError(f"invalid template {template!r}: {e}", "JsonlTask",
                    "write fields as {name}; double literal braces: {{ }}") from None


def _render(template: str, record: Record) -> Any:
  """The template filled from the record; a lone placeholder gives the raw JSON value."""
  names = _placeholders(template)
  if len(names) == 1 and template == "{" + names[0] + "}":
    return record[names[0]]
  return template.format_map({k: record[k] for k in names})


def _templates(value) -> list[str]:
  if value is None:
    return []
  return list(value.values()) if isinstance(value, Mapping) else [value]


def _render_any(value, record: Record):
  if isinstance(value, Mapping):
    return {k: _render(t, record) for k, t in value.items()}
  return _render(value, record)


def _files(task: str, split: str, pattern: str) -> list[str]:
  """The files matching `pattern`, sorted; at least one."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  check(bool(files), f"no file matches {pattern!r}", _where(task, split),
        "give an existing .jsonl file or glob (relative to the working directory)")
  return files


def _where(task: str, split: str) -> str:
  return f"JsonlTask.splits[{split!r}] of task {task!r}"


def _lines(path: str, where: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of a JSON-lines file, read as they are consumed. Lines end at \n
  only: U+2028 or U+0085 inside a JSON string is text."""
  try:
    with open(path, encoding="utf-8", newline="\n") as f:
      for number, line in enumerate(f, 1):
        yield number, line.rstrip("\n").removesuffix("\r")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}", where, "give a UTF-8 JSON-lines file") from None


def read_jsonl(task: str, split: str, pattern: str, needed: Mapping[str, str],
               fields: Mapping[str, str], limit: int | None = None) -> list[Record]:
  """Records of every file matching `pattern` (sorted), renamed by `fields` ({name: JSON
  key}); every name in `needed` ({name: what uses it}) must be in every record read. With
  `limit`, only the first `limit` records are read (and checked)."""
  files = _files(task, split, pattern)
  where = _where(task, split)
  keys = {name: fields.get(name, name) for name in needed}
  records, missing, whole = [], {}, True
  for path in files:
    for number, line in _lines(path, where):
      if limit is not None and len(records) >= limit:
        whole = False
        break
      if not line.strip():
        continue
      try:
        raw = validation.parse_json(line)
      except validation.DocumentError as e:
        raise UserError(f"line {number} of {path} is beyond what is read: {e}", where,
                        "make every line one plain JSON object") from None
      except ValueError as e:  # JSONDecodeError, NaN tokens
        raise UserError(f"malformed JSON on line {number} of {path}: "
                        f"{getattr(e, 'msg', e)}", where,
                        "make every line one JSON object") from None
      check(isinstance(raw, dict), f"line {number} of {path} is not a JSON object", where,
            "make every line one JSON object")
      for name, key in keys.items():
        if key not in raw:
          missing.setdefault(name, (path, number))
      records.append({**raw, **{n: raw[k] for n, k in keys.items() if k in raw}})
  check(bool(records), f"no records in {', '.join(files)}", where, "add JSON lines")
  for name, (path, number) in missing.items():
    key = keys[name]
    if any(key in r for r in records):
      what = f"field {key!r} is absent on line {number} of {path}"
    elif whole:
      what = f"unknown field {key!r}: no record in {pattern} has it"
    else:  # only the first lines were read
      what = f"unknown field {key!r}: line {number} of {path} does not have it"
    raise UserError(what, f"{needed[name]} of task {task!r}",
                    "add it, map it with JsonlTask.fields, or fix the template")
  return records


def _validate(t: JsonlTask) -> None:
  where = f"JsonlTask {t.name!r}"
  check(isinstance(t.name, str) and bool(t.name), "a JsonlTask needs a name", "JsonlTask.name")
  check(t.kind in scoring.KIND_NAMES, f"unknown kind {t.kind!r}", f"{where}.kind",
        f"choose from: {', '.join(scoring.KIND_NAMES)}")
  check(isinstance(t.splits, Mapping) and bool(t.splits),
        "splits must map split names to files", f"{where}.splits",
        "e.g. {'dev': 'data/dev.jsonl', 'test': 'data/test.jsonl'}")
  if t.verifier is not None:
    check(t.kind == "generate", f"a verifier ({t.verifier!r}) is given to kind {t.kind!r}, "
          "which does not generate", f"{where}.verifier",
          "use kind='generate', or drop the verifier")
    verifiers.get(t.verifier, f"{where}.verifier")
  if t.kind == "generate":
    v = verifiers.get(t.verifier or "exact_match", f"{where}.verifier")
    v.with_options(t.verifier_options, f"{where}.verifier_options")
    v.check_metric(t.metric, f"{where}.metric")
  else:
    check(not t.verifier_options, f"verifier_options are given to kind {t.kind!r}, which has "
          "no verifier", f"{where}.verifier_options", "use kind='generate', or drop them")
    scoring.Scoring(t.kind, metric=t.metric or "", target_delimiter=t.target_delimiter)
  if t.kind == "choice":
    check(bool(t.choices and t.label), "kind 'choice' needs the `choices` and `label` fields",
          f"{where}.choices/label", "name the list-of-choices field and the label field")
  else:
    check(t.target is not None, f"kind {t.kind!r} needs a target template", f"{where}.target",
          "e.g. target='{answer}'")
    check(t.kind == "generate" or isinstance(t.target, str),
          "kind 'exact' needs a text target template", f"{where}.target")
  check(isinstance(t.few_shot, int) and t.few_shot >= 0,
        f"few_shot must be a non-negative integer, got {t.few_shot!r}", f"{where}.few_shot")
  if t.few_shot:
    check(t.few_shot_split in t.splits and t.few_shot_split not in ("dev", "test"),
          f"few-shot examples need a split that is not scored, got {t.few_shot_split!r}",
          f"{where}.few_shot_split", "add a 'train' file to splits")
  if t.kind == "generate":
    scoring.Scoring("generate", t.max_new_tokens, tuple(t.stop))


def _answer_template(t: JsonlTask) -> str | None:
  if t.answer is not None:
    return t.answer
  return t.target if isinstance(t.target, str) else None


def _examples(t: JsonlTask, split: str, records: list[Record], shots: str) -> dict:
  """Columns of the split's dataset."""
  cols = {"inputs": [shots + str(_render(t.prompt, r)) for r in records]}
  if t.id:  # the records' own names, for `verify`
    cols["doc_key"] = [str(r[t.id]) for r in records]
  if t.kind == "choice":
    choices, labels = [], []
    for i, r in enumerate(records):
      options, label = [str(c) for c in r[t.choices]], r[t.label]
      if isinstance(label, str) and label in options:
        label = options.index(label)
      check(isinstance(label, int) and 0 <= label < len(options),
            f"label {r[t.label]!r} of record {i + 1} is not an index or text of its "
            f"{len(options)} choices", f"JsonlTask {t.name!r} split {split!r}")
      choices.append(options)
      labels.append(label)
    cols.update(targets=[c[l] for c, l in zip(choices, labels)], choices=choices,
                label=labels)
    return cols
  answer = _answer_template(t)
  cols["targets"] = [str(_render(answer, r)) if answer else "" for r in records]
  if t.kind == "generate":
    cols["verifier_target"] = [json.dumps(_render_any(t.target, r)) for r in records]
  return cols


def _shots(t: JsonlTask, train: list[Record]) -> str:
  if not t.few_shot:
    return ""
  check(len(train) >= t.few_shot, f"few_shot={t.few_shot} but split {t.few_shot_split!r} has "
        f"{len(train)} records", f"JsonlTask {t.name!r}")
  picked = random.Random(t.seed).sample(train, t.few_shot)
  if t.kind == "choice":
    answers = [str(r[t.choices][r[t.label]] if isinstance(r[t.label], int) else r[t.label])
               for r in picked]
  else:
    template = _answer_template(t)
    check(template is not None, "few-shot examples need an answer template",
          f"JsonlTask {t.name!r}.answer", "e.g. answer='{canonical_solution}'")
    answers = [str(_render(template, r)) for r in picked]
  # choice and exact answers follow the prompt as they are scored: after the delimiter
  delimiter = t.target_delimiter if t.kind != "generate" else ""
  return "".join(f"{_render(t.prompt, r)}{delimiter}{a}{t.separator}"
                 for r, a in zip(picked, answers))


def chat_template_fn(vocabulary):
  """The vocabulary's chat template as `prompt -> text`, or None when it has none (the
  pool's tokenizer provides it as `apply_chat_template(text) -> text`)."""
  fn = getattr(vocabulary, "apply_chat_template", None)
  return fn if callable(fn) else None


def _chat_preprocessor(task: str):
  def apply(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    vocab = output_features["inputs"].vocabulary
    fn = chat_template_fn(vocab)
    check(fn is not None, f"task {task!r} asks for a chat template, but its vocabulary "
          f"{type(vocab).__name__} has none", f"JsonlTask {task!r}.chat_template",
          "use a pool whose tokenizer has a chat template, or chat_template=False")
    # Rendered here, in the calling thread, not in a tf.data function: a template that
    # fails is one line (not TensorFlow's UnknownError), its time bound and Ctrl-C/SIGTERM
    # apply as to any Python code.
    texts = [fn(s.decode()) for s in dataset.map(lambda ex: ex["inputs"]).as_numpy_iterator()]
    rendered = tf.data.Dataset.from_tensor_slices(tf.constant(texts, tf.string, [len(texts)]))
    return tf.data.Dataset.zip((dataset, rendered)).map(lambda ex, r: {**ex, "inputs": r})
  return apply


def postprocess(output, example=None, is_target=False):
  """Targets of 'generate' tasks are their verifier's JSON targets; outputs pass as is."""
  if is_target and example is not None and "verifier_target" in example:
    raw = example["verifier_target"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
  return output


def register(t: JsonlTask, vocabulary: seqio.Vocabulary = vocabularies.POOL,
             records: Mapping[str, list[Record]] | None = None) -> str:
  """Validates `t`, reads its files (or takes `records`, {split: [record]}, for data that
  ships in a package) and registers it in seqio.TaskRegistry, replacing a task of the same
  name. Returns its name. Its text is tokenized with `vocabulary`: by default the
  vocabulary of the pool it is evaluated on (`vocabularies.POOL`)."""
  _validate(t)
  templates = {"JsonlTask.prompt": [t.prompt], "JsonlTask.target": _templates(t.target),
               "JsonlTask.answer": _templates(t.answer)}
  needed = {f: what for what, ts in templates.items() for tpl in ts for f in _placeholders(tpl)}
  if t.kind == "choice":
    needed.update({t.choices: "JsonlTask.choices", t.label: "JsonlTask.label"})
  if t.id:
    needed[t.id] = "JsonlTask.id"
  if records is None:  # a missing file or a misnamed field is found now (first lines);
    for split, pattern in t.splits.items():  # every line when the split is read
      read_jsonl(t.name, split, pattern, needed, t.fields, limit=1)
  read: dict[tuple[str, int | None], list[Record]] = {}

  def rows(split: str, limit: int | None = None) -> list[Record]:
    """The split's first `limit` records (all: None), each file read at most as far."""
    for (s, n), got in read.items():
      if s == split and (n is None or (limit is not None and n >= limit)):
        return got[:limit]
    if records is None:
      got = read_jsonl(t.name, split, t.splits[split], needed, t.fields, limit)
    else:
      got = [{**r, **{n: r[k] for n, k in t.fields.items()}} for r in records[split][:limit]]
    read[(split, limit)] = got
    return got

  def dataset_fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    # few-shot examples are drawn from the whole few-shot split, as without a limit
    shots = _shots(t, rows(t.few_shot_split)) if t.few_shot else ""
    cols = _examples(t, split, rows(split, task_splits.read_limit()), shots)
    if "choices" in cols:  # any number of choices per example
      cols["choices"] = tf.ragged.constant(cols["choices"])
    return tf.data.Dataset.from_tensor_slices(cols)

  preprocessors = [_chat_preprocessor(t.name)] if t.chat_template else []
  preprocessors += [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
  seqio.TaskRegistry.remove(t.name)
  seqio.TaskRegistry.add(
      t.name, source=seqio.FunctionDataSource(dataset_fn, splits=list(t.splits)),
      preprocessors=preprocessors, postprocess_fn=postprocess,
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
      metric_fns=[verifiers.get(t.verifier or "exact_match").with_options(t.verifier_options)]
      if t.kind == "generate" else [])
  scoring.declare(t.name, scoring.Scoring(t.kind, t.max_new_tokens, tuple(t.stop),
                                          metric=t.metric or "",
                                          target_delimiter=t.target_delimiter))
  return t.name


def register_all(tasks: Sequence[JsonlTask] = ()) -> list[str]:
  """Registers JsonlTasks (in gin: `jsonl_tasks.tasks = [@qa/JsonlTask()]`)."""
  return [register(t) for t in tasks]


def import_modules(names: Sequence[str], where: str = "--task_module") -> None:
  """Imports modules that register seqio Tasks; the working directory is searched too."""
  cwd = os.getcwd()
  if cwd not in sys.path:
    sys.path.insert(0, cwd)
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise UserError(f"cannot import task module {name!r}: {e}", where,
                      "give a module importable from the working directory or PYTHONPATH "
                      "(my_tasks for ./my_tasks.py)") from None
