"""The embedded benchmark as seqio Tasks, with exactly checkable answers.

Analogues of the paper's tasks at a size a 2-core machine trains in minutes:

  held-in   rj_code       (MBPP)      Python snippets; the answer is what Python prints
            rj_math       (GSM8K)     arithmetic, one and two steps
            rj_instruct   (IFEval)    string-formatting instructions, one exact answer
            rj_knowledge  (MMLU-Pro)  multiple choice over facts of a generated world
            rj_reasoning  (MUSR)      multiple choice: comparisons, chained or not
  held-out  rj_code_ood   (LBPP)      snippets composing operations never trained on
            rj_chat_ood   (MT-Bench)  instructions combined in ways never trained on

Generation answers come from executing the code (`exec`, the verifier) or from Python's
own string methods. Every split is disjoint (items are deduplicated by prompt before they
are cut into train/dev/test) and the held-out tasks have no train split at all.
`general_text` is the pretraining corpus: Python's standard library source (real code)
plus the world's fact sentences.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import sysconfig
from typing import Callable, Iterator

import seqio
import tensorflow as tf

from recycle_jax.models import VOCAB

SPLITS = ("train", "dev", "test")
NUM_EVAL = {"dev": 128, "test": 128}
NUM_TRAIN = 4000
HELD_IN = ("rj_code", "rj_math", "rj_instruct", "rj_knowledge", "rj_reasoning")
HELD_OUT = ("rj_code_ood", "rj_chat_ood")
SEED = 1234

# ----------------------------------------------------------------------------- items

_LETTERS = "abcdefghijklmnoprstuw"


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
  return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _run(code: str) -> str:
  """The verifier: what Python prints for a generated snippet."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(code, {})  # generated here from fixed templates, never user input
  return out.getvalue().strip()


_CODE_TEMPLATES = (
    "print('{s}'.upper())",
    "print('{s}'[0])",
    "print('{s}'[-1])",
    "print(len('{s}'))",
    "print('{s}'*2)",
    "print('{s}'+'{t}')",
    "print(max({a},{b}))",
    "print(min({a},{b}))",
    "print({a}+{b})",
)
_CODE_OOD_TEMPLATES = (
    "print('{s}'.upper()*2)",
    "print(len('{s}'+'{t}'))",
    "print(max({a},{b})+{c})",
    "print('{s}'[0]+'{t}'[-1])",
)


def _code_item(rng: random.Random, templates) -> dict:
  s = _word(rng)
  code = rng.choice(templates).format(a=rng.randint(0, 9), b=rng.randint(0, 9),
                                      c=rng.randint(0, 9), s=s, t=_word(rng, 2, 3),
                                      i=rng.randrange(len(s)))
  return {"inputs": f"{code}\n# ", "targets": _run(code)}


def _math_item(rng: random.Random) -> dict:
  a, b, c = rng.randint(0, 30), rng.randint(0, 9), rng.randint(0, 9)
  expr = rng.choice((f"{a}+{b}", f"{a}-{b}", f"{c}*{b}", f"{a}+{b}-{c}", f"{b}+{c}"))
  return {"inputs": f"{expr}=", "targets": str(eval(expr))}


_SEPS = {"commas": ",", "dashes": "-", "spaces": " ", "dots": "."}
_INSTRUCTIONS: dict[str, Callable[[str], str]] = {
    "in capital letters": str.upper,
    "backwards": lambda w: w[::-1],
    "in square brackets": lambda w: f"[{w}]",
    "twice": lambda w: w + w,
}


def _instruct_item(rng: random.Random, ood: bool = False) -> dict:
  w = _word(rng)
  if not ood:
    kind = rng.randrange(3)
    if kind == 0:
      how = rng.choice(list(_INSTRUCTIONS))
      return {"inputs": f"Write {w} {how}.\n> ",
              "targets": _INSTRUCTIONS[how](w)}
    if kind == 1:
      k, sep = rng.randint(2, 4), rng.choice(list(_SEPS))
      return {"inputs": f"Repeat {w} {k} times with {sep}.\n> ",
              "targets": _SEPS[sep].join([w] * k)}
    k = rng.randint(1, len(w) - 1)
    return {"inputs": f"Write the first {k} letters of {w}.\n> ",
            "targets": w[:k]}
  # Held-out: two instructions composed, never seen together in training.
  h1, h2 = rng.sample(list(_INSTRUCTIONS), 2)
  return {"inputs": f"Write {w} {h1} and {h2}.\n> ",
          "targets": _INSTRUCTIONS[h2](_INSTRUCTIONS[h1](w))}


# A generated world whose facts appear only in the pretraining text.
_RELATIONS = {
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "home": ("forest", "river", "desert", "mountain", "city", "cave"),
    "food": ("fish", "grass", "seeds", "fruit", "bugs", "honey"),
}
_FACT = {"color": "The {e} is {v}.", "home": "The {e} lives in the {v}.",
         "food": "The {e} eats {v}."}
_QUESTION = {"color": "What color is the {e}?", "home": "Where does the {e} live?",
             "food": "What does the {e} eat?"}


@functools.lru_cache(None)
def world(num_entities: int = 120) -> tuple[tuple[str, str, str], ...]:
  """(entity, relation, value) facts; entities are unique generated names."""
  rng = random.Random(SEED + 7)
  names: list[str] = []
  while len(names) < num_entities:
    n = _word(rng, 4, 6)
    if n not in names:
      names.append(n)
  return tuple((e, r, rng.choice(vals)) for e in names for r, vals in _RELATIONS.items())


def _knowledge_items(rng: random.Random) -> list[dict]:
  items = []
  for e, r, v in world():
    wrong = rng.sample([x for x in _RELATIONS[r] if x != v], 3)
    choices = [v] + wrong
    rng.shuffle(choices)
    items.append({"inputs": f"{_QUESTION[r].format(e=e)} ",
                  "targets": v, "choices": choices, "label": choices.index(v)})
  rng.shuffle(items)
  return items


_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou")


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
    "rj_code": functools.partial(_code_item, templates=_CODE_TEMPLATES),
    "rj_math": _math_item,
    "rj_instruct": _instruct_item,
    "rj_reasoning": _reasoning_item,
    "rj_code_ood": functools.partial(_code_item, templates=_CODE_OOD_TEMPLATES),
    "rj_chat_ood": functools.partial(_instruct_item, ood=True),
}


@functools.lru_cache(None)
def items(task: str) -> dict[str, list[dict]]:
  """{split: [example dicts]}, disjoint by prompt; held-out tasks have no train split."""
  seed = SEED + sum(map(ord, task))
  n_eval = NUM_EVAL["dev"] + NUM_EVAL["test"]
  if task == "rj_knowledge":
    pool = _knowledge_items(random.Random(seed))
  else:
    pool = _unique(_GENERATORS[task], n_eval + (0 if task in HELD_OUT else NUM_TRAIN), seed)
  dev, test = pool[:NUM_EVAL["dev"]], pool[NUM_EVAL["dev"]:n_eval]
  return {"dev": dev, "test": test, "train": [] if task in HELD_OUT else pool[n_eval:]}


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

def _dataset_fn(task: str):
  def fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    rows = items(task)[split]
    cols = {"inputs": [r["inputs"] for r in rows], "targets": [r["targets"] for r in rows]}
    if rows and "choices" in rows[0]:
      cols["choices"] = [r["choices"] for r in rows]
      cols["label"] = [r["label"] for r in rows]
    if not rows:
      return tf.data.Dataset.from_tensor_slices(
          {"inputs": tf.constant([], tf.string), "targets": tf.constant([], tf.string)})
    return tf.data.Dataset.from_tensor_slices(cols)
  return fn


def _exact_match(targets, predictions) -> dict:
  return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions))
                         / max(len(targets), 1)}


def register() -> None:
  """Registers every benchmark task in seqio.TaskRegistry (idempotent)."""
  features = {"inputs": seqio.Feature(VOCAB, add_eos=False),
              "targets": seqio.Feature(VOCAB, add_eos=True)}
  for name in HELD_IN + HELD_OUT:
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_dataset_fn(name), splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=features,
        metric_fns=[_exact_match])


register()
