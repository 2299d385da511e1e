"""The embedded benchmark as seqio Tasks, with exactly checkable answers.

Analogues of the paper's tasks at a size a 2-core machine trains in minutes:

  held-in   rj_code       (MBPP)      string snippets; the answer is what Python prints
            rj_math       (GSM8K)     one-step word problems over single digits
            rj_instruct   (IFEval)    formatting instructions with one exact answer
            rj_knowledge  (MMLU-Pro)  multiple choice: cloze probes of the world's facts
            rj_reasoning  (MUSR)      multiple choice: comparisons, chained or not
  held-out  rj_code_ood   (LBPP)      multiple choice: the operations in a syntax never
                                      trained on (literals instead of variables)
            rj_chat_ood   (MT-Bench)  multiple choice: the instructions paraphrased

Generation answers come from executing the code (`exec`) or from fixed formatting
functions. Scoring (`scoring.Scoring`, `verifiers`): rj_code decodes greedily and the
`output_prediction` verifier executes the snippet in the sandbox and compares what it
prints with the generation; rj_math decodes greedily and the `numeric` verifier compares
the extracted numbers (lm-eval gsm8k's flexible-extract); rj_instruct scores whether the
answer and EOS are the greedy continuation (`exact`, is_greedy_eos); the multiple choice
tasks rank classification by summed log-likelihood (lm-eval's acc). Every split is
disjoint (items are deduplicated by prompt before they are cut into train/dev/test) and
held-out tasks have no train split.
The pretraining text is Python's standard library source (real code) plus the generated
world's fact sentences, the only place rj_knowledge's answers appear.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import keyword
import os
import random
import sysconfig
from typing import Callable

import seqio
import tensorflow as tf

from recycle_jax.evaluation import scoring, verifiers
from recycle_jax.tasks import jsonl
from recycle_jax.runtime.errors import check
from recycle_jax.evaluation.vocabularies import POOL

SPLITS = ("train", "dev", "test")
DEV_BASE = 128  # dev items per task by default: the first block of every task's stream
NUM_TEST = 128  # test items per task (never change: every pool was scored on them)
NUM_TRAIN = 4000
HELD_IN = ("rj_code", "rj_math", "rj_instruct", "rj_knowledge", "rj_reasoning")
HELD_OUT = ("rj_code_ood", "rj_chat_ood")
SEED = 1234

# ----------------------------------------------------------------------------- items
# Sized for a 2-layer byte-level model trained for minutes: every answer is a function of
# a few salient tokens (a word from a closed vocabulary, an operation, digits), which such
# a model learns from a few hundred steps and forgets when fine-tuned on something else.
# (Copying arbitrary strings needs induction heads, which it does not form in that budget.)

# The closed vocabulary that code snippets and instructions operate on.
WORDS = ("cat", "dog", "sun", "owl", "bee", "fox", "cow", "pig", "hen", "jam", "tea", "map",
         "box", "cup", "pen", "ink", "oak", "elm", "ash", "fig", "yak", "emu", "ant", "bus")
_VARS = tuple(v for a in "abcdefghkmnpqrstuvwxyz" for b in "abcdeinorstuy"
              if not keyword.iskeyword(v := a + b))
_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou")
_THINGS = ("apples", "books", "coins", "eggs", "figs", "hats", "keys", "pens", "rings",
           "shells", "stamps", "toys")


def _run(code: str) -> str:
  """The verifier: what Python prints for a generated snippet."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(code, {})  # generated here from fixed templates, never user input
  return out.getvalue().strip()


def _choice_item(rng: random.Random, prompt: str, answer: str, wrong: list[str]) -> dict:
  choices = [answer] + wrong
  rng.shuffle(choices)
  return {"inputs": prompt, "targets": answer, "choices": choices,
          "label": choices.index(answer)}


# String operations; the answer is what the snippet prints (never a number: arithmetic is
# rj_math's skill).
_STR_OPS = (".upper()", "[0]", "[-1]", "[::-1]", "*2", "[1:]", ".title()")


def _code_item(rng: random.Random) -> dict:
  v, w, op = rng.choice(_VARS), rng.choice(WORDS), rng.choice(_STR_OPS)
  code = f"{v} = '{w}'\nprint({v}{op})"
  return {"inputs": f"{code}\n# ", "targets": _run(code), "program": code}


def _code_ood_item(rng: random.Random) -> dict:
  """Held out (multiple choice): the operations applied to a literal, a syntax no training
  snippet uses; the wrong choices are what the other operations print."""
  w, op = rng.choice(WORDS), rng.choice(_STR_OPS)
  code = f"print('{w}'{op})  # {rng.choice(_VARS)}"
  answer = _run(code)
  wrong = sorted({_run(f"print('{w}'{o})") for o in _STR_OPS} - {answer})
  return _choice_item(rng, f"{code}\n# ", answer, rng.sample(wrong, 3))


def _math_item(rng: random.Random) -> dict:
  """One-step word problems over single digits (GSM8K's shape, not its difficulty)."""
  n, x = rng.choice(_NAMES), rng.choice(_THINGS)
  a, b = rng.randint(0, 9), rng.randint(0, 9)
  if rng.random() < 0.5:
    q, ans = f"{n} had {x}. Got {a} and then {b} more. How many?", a + b
  else:
    a, b = max(a, b), min(a, b)
    q, ans = f"{n} had {x}. Got {a} and then {b} were lost. How many?", a - b
  return {"inputs": f"Q: {q}\nA: ", "targets": str(ans)}


# Formatting instructions with one exact answer (IFEval's verifiable constraints).
_INSTRUCTIONS: dict[str, Callable[[str], str]] = {
    "put {w} in brackets": lambda w: f"[{w}]",
    "put {w} in parentheses": lambda w: f"({w})",
    "say {w} twice": lambda w: f"{w} {w}",
    "shout {w}": lambda w: f"{w.upper()}!",
    "quote {w}": lambda w: f'"{w}"',
    "spell {w}": lambda w: "-".join(w),
}
# Held out (multiple choice): the same constraints asked in words no training instruction
# uses; the wrong choices are the other constraints' answers.
_CHAT_OOD: dict[str, str] = {
    "wrap {w} in square brackets": "put {w} in brackets",
    "wrap {w} in round brackets": "put {w} in parentheses",
    "repeat {w} two times": "say {w} twice",
    "yell {w}": "shout {w}",
    "cite {w} verbatim": "quote {w}",
    "write {w} letter by letter": "spell {w}",
}


def _instruct_item(rng: random.Random) -> dict:
  n, w, how = rng.choice(_NAMES), rng.choice(WORDS), rng.choice(list(_INSTRUCTIONS))
  return {"inputs": f"{n}: {how.format(w=w)}, please.\n> ", "targets": _INSTRUCTIONS[how](w)}


def _chat_ood_item(rng: random.Random) -> dict:
  n, w, ask = rng.choice(_NAMES), rng.choice(WORDS), rng.choice(list(_CHAT_OOD))
  answer = _INSTRUCTIONS[_CHAT_OOD[ask]](w)
  wrong = [f(w) for k, f in _INSTRUCTIONS.items() if k != _CHAT_OOD[ask]]
  return _choice_item(rng, f"{n}: {ask.format(w=w)}, please.\n> ", answer,
                      rng.sample(wrong, 3))


# A generated world whose facts appear only in the pretraining text ('facts' source);
# rj_knowledge probes them LAMA-style: rank the true object against the relation's others.
_LETTERS = "abcdefghijklmnoprstuw"
_RELATIONS = {
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "home": ("forest", "river", "desert", "mountain", "city", "cave"),
    "food": ("fish", "grass", "seeds", "fruit", "bugs", "honey"),
}
_FACT = {"color": "The {e} is {v}.", "home": "The {e} lives in the {v}.",
         "food": "The {e} eats {v}."}


@functools.lru_cache(None)
def world(num_entities: int = 96) -> tuple[tuple[str, str, str], ...]:
  """(entity, relation, value) facts; entities are unique generated names."""
  rng = random.Random(SEED + 7)
  names: list[str] = []
  while len(names) < num_entities:
    n = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 6)))
    if n not in names:
      names.append(n)
  return tuple((e, r, rng.choice(vals)) for e in names for r, vals in _RELATIONS.items())


def _knowledge_items(rng: random.Random) -> list[dict]:
  items = []
  for e, r, v in world():
    prompt = _FACT[r].format(e=e, v="\0").split("\0")[0]
    items.append(_choice_item(rng, prompt, v,
                              rng.sample([x for x in _RELATIONS[r] if x != v], 3)))
  rng.shuffle(items)
  return items


def _reasoning_item(rng: random.Random) -> dict:
  adj, sup = rng.choice((("older", "oldest"), ("taller", "tallest"), ("faster", "fastest")))
  if rng.random() < 0.5:
    x, y = rng.sample(_NAMES, 2)  # x > y
    story, answer, choices = f"{x} is {adj} than {y}.", x, [x, y]
    q = f"{adj.capitalize()}?"
  else:
    x, y, z = rng.sample(_NAMES, 3)  # x > y > z
    facts = [f"{x} is {adj} than {y}.", f"{y} is {adj} than {z}."]
    rng.shuffle(facts)
    story, answer, choices = " ".join(facts), x, [x, y, z]
    q = f"{sup.capitalize()}?"
  while len(choices) < 3:
    choices.append(rng.choice([n for n in _NAMES if n not in choices]))
  rng.shuffle(choices)
  return {"inputs": f"{story} {q} ", "targets": answer, "choices": choices,
          "label": choices.index(answer)}


def _unique(make: Callable[[random.Random], dict], n: int, seed: int) -> list[dict]:
  rng, seen, out = random.Random(seed), set(), []
  for _ in range(50 * n):
    item = make(rng)
    if item["inputs"] not in seen:
      seen.add(item["inputs"])
      out.append(item)
      if len(out) == n:
        break
  return out


_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "rj_code": _code_item,
    "rj_math": _math_item,
    "rj_instruct": _instruct_item,
    "rj_reasoning": _reasoning_item,
    "rj_code_ood": _code_ood_item,
    "rj_chat_ood": _chat_ood_item,
}


def check_dev_size(n: int | None) -> int:
  """The dev split's size per task (None: the default 128); test and train never change.
  The first min(n, 128) dev items are the default dev items; more are generated after the
  training items (the generators' streams are prefix-stable), so a larger dev split never
  overlaps train or test."""
  check(n is None or n >= 1, f"dev size {n}", "--dev_size", "pass a positive number")
  return DEV_BASE if n is None else int(n)


@functools.lru_cache(None)
def items(task: str, dev_size: int = DEV_BASE) -> dict[str, list[dict]]:
  """{split: [example dicts]}, disjoint by prompt; held-out tasks have no train split.

  Layout of a task's item stream: 128 dev items, NUM_TEST test items, the train items,
  then the dev items beyond 128 (`dev_size`, see `check_dev_size`). A task whose stream runs out (its
  item space is small) has a shorter dev split; `_dataset_fn` refuses to read it."""
  seed = SEED + sum(map(ord, task))
  n_eval = DEV_BASE + NUM_TEST
  extra = max(0, dev_size - DEV_BASE)
  if task == "rj_knowledge":  # a fixed world: every item past test is train
    pool = _knowledge_items(random.Random(seed))
    n_train = len(pool) - n_eval
  else:
    n_train = 0 if task in HELD_OUT else NUM_TRAIN
    pool = _unique(_GENERATORS[task], n_eval + n_train + extra, seed)
  after = n_eval + n_train
  dev = pool[:min(dev_size, DEV_BASE)] + pool[after:after + extra]
  return {"dev": dev, "test": pool[DEV_BASE:n_eval], "train": pool[n_eval:after]}


# ----------------------------------------------------------------------------- text

@functools.lru_cache(None)
def stdlib_code(max_bytes: int = 2_000_000) -> str:
  """Real code: Python's standard library source (tests excluded), sorted, ASCII only."""
  root, chunks, total = sysconfig.get_paths()["stdlib"], [], 0
  for dirpath, dirnames, files in sorted(os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
    for f in sorted(files):
      if f.endswith(".py") and not f.startswith("test"):
        try:
          text = open(os.path.join(dirpath, f), encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
          continue
        text = text.encode("ascii", "ignore").decode()
        chunks.append(text)
        total += len(text)
        if total >= max_bytes:
          return "\n".join(chunks)
  return "\n".join(chunks)


def fact_sentences() -> list[str]:
  return [_FACT[r].format(e=e, v=v) for e, r, v in world()]


# ----------------------------------------------------------------------------- seqio

# Generated tasks' scoring: decode at most max_new_tokens (answers are a few bytes), stop at
# a newline, score with the verifier's named metric (rj_math's answers are bare numbers:
# lm-eval gsm8k's flexible-extract). The rest: is_greedy of the answer followed by EOS
# (rj_instruct asks for exactly the answer) or choice by summed log-likelihood (lm-eval's
# acc). Prompts end with the separator, so the target delimiter is empty.
_VERIFIED = {"rj_code": ("output_prediction", 16, "output_match"),
             "rj_math": ("numeric", 8, "flexible-extract")}
_SCORED = {"rj_instruct": scoring.Scoring("exact", metric="is_greedy_eos", target_delimiter="")}
_CHOICE = scoring.Scoring("choice", metric="acc", target_delimiter="")


def _dataset_fn(task: str, dev_size: int):
  def fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    rows = items(task, dev_size)[split]
    if split == "dev":
      check(len(rows) == dev_size, f"task {task!r} has {len(rows)} dev items that "
            f"overlap neither train nor test, not {dev_size}", "--dev_size",
            f"choose at most {len(rows)} for {task}, or leave it out of the tasks")
    cols = {"inputs": [r["inputs"] for r in rows], "targets": [r["targets"] for r in rows]}
    if rows and "choices" in rows[0]:
      cols["choices"] = tf.ragged.constant([r["choices"] for r in rows])  # any count
      cols["label"] = [r["label"] for r in rows]
    if rows and "program" in rows[0]:  # the verifier's target (jsonl.postprocess)
      cols["verifier_target"] = [json.dumps({"program": r["program"]}) for r in rows]
    if not rows:
      return tf.data.Dataset.from_tensor_slices(
          {"inputs": tf.constant([], tf.string), "targets": tf.constant([], tf.string)})
    return tf.data.Dataset.from_tensor_slices(cols)
  return fn


_REGISTERED_DEV_SIZE: list[int] = []  # the dev size the registered tasks were built with


def register(dev_size: int | None = None) -> None:
  """Registers every benchmark task in seqio.TaskRegistry with `dev_size` dev items per
  task (`check_dev_size`; None keeps the size registered, else 128); registered again only
  when the size changes (the caller then drops splits it materialized:
  task_splits.forget_splits)."""
  registered = all(n in seqio.TaskRegistry.names() for n in HELD_IN + HELD_OUT)
  if dev_size is None and registered and _REGISTERED_DEV_SIZE:
    return
  dev_size = check_dev_size(dev_size)
  if _REGISTERED_DEV_SIZE == [dev_size] and registered:
    return
  _REGISTERED_DEV_SIZE[:] = [dev_size]
  # Tokenized with the vocabulary of the pool they are evaluated on (vocabularies.bind).
  features = {"inputs": seqio.Feature(POOL, add_eos=False),
              "targets": seqio.Feature(POOL, add_eos=True)}
  for name in HELD_IN + HELD_OUT:
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    verifier, max_new, metric = _VERIFIED.get(name, (None, 0, ""))
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_dataset_fn(name, dev_size), splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=features, postprocess_fn=jsonl.postprocess,
        metric_fns=[verifiers.get(verifier)] if verifier else [])
    if verifier:
      scoring.declare(name, scoring.Scoring("generate", max_new, ("\n",), metric=metric))
    else:
      scoring.declare(name, _SCORED.get(name, _CHOICE))

