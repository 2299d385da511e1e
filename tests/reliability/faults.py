"""Generated bad inputs for every command: the fault-injection suite's cases.

Cases are generated, not listed: from argparse's actions (types, choices, ranges in
`validation.BOUNDS`), from gin's registry of configurables (their annotations and bounds),
from the bytes and JSON fields of real input files (manifests, checkpoint metadata, HF
config.json, search state, results.json, safetensors), and from the destinations of
every output (inputs, read-only, full, out of inodes, other filesystems, another live
writer of it or of the workdir around it). Every JSON file, JSONL line and mergekit YAML
also gets hostile documents (nesting past any bound, an alias bomb, a number beyond float
range, a lone surrogate), every safetensors file lying headers (an F32 weight declared
I32, overlapping byte ranges). A new flag, binding, field, file or reader is covered
without a new test.

Each `Case` builds its inputs in a fresh directory from a shared `World` (a tiny pool, a
Hugging Face copy of one member, a finished tiny search) and says what the one `error:`
line must name.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = "rj_knowledge"


# ----------------------------------------------------------------------------- the world

@dataclasses.dataclass(frozen=True)
class World:
  """Good inputs, written once per session; cases copy what they damage."""
  root: str
  pool: str  # pool.json of members a, b, c
  hf: str  # a Hugging Face folder (member a, converted)
  run: str  # workdir of a finished tiny search (results.json, search_state)
  gin: str  # a valid gin file for search
  hf_pool: str  # pool.json of Hugging Face folders a, b, c (sharded safetensors)
  merge_yml: str  # a mergekit config: the linear merge of those folders
  task_gin: str  # a gin file declaring the JSONL task TASK_JSONL over task/{dev,test}.jsonl

  @property
  def pool_dir(self) -> str:
    return os.path.dirname(self.pool)

  def member(self, name: str) -> str:
    return os.path.join(self.pool_dir, name)

  @property
  def hf_pool_dir(self) -> str:
    return os.path.dirname(self.hf_pool)


@functools.lru_cache(None)
def world() -> World:
  import jax
  from recycle_jax import cli
  from recycle_jax.checkpoint_io import hf_folder
  from recycle_jax.models import transformer
  import hf_fixtures
  from reliability_util import CFG, write_checkpoint, write_manifest
  keep = os.environ.get("RJ_FAULT_WORLD")  # a directory to reuse between runs (debugging)
  if keep and os.path.isfile(os.path.join(keep, "world.json")):
    return World(**json.load(open(os.path.join(keep, "world.json"))))
  root = keep or tempfile.mkdtemp(prefix="rj_faults_")
  os.makedirs(root, exist_ok=True)
  if not keep:
    atexit.register(lambda: (unmount_all(root), shutil.rmtree(root, ignore_errors=True)))
  os.chmod(root, 0o755)  # cases run as another user (permissions) read it too
  pool_dir = os.path.join(root, "pool")
  paths = {n: write_checkpoint(os.path.join(pool_dir, n), seed=i) for i, n in enumerate("abc")}
  pool = write_manifest(os.path.join(pool_dir, "pool.json"), paths)
  hf = os.path.join(root, "hf")
  params = jax.tree.map(np.asarray, transformer.init_params(CFG, jax.random.key(0)))
  hf_folder.save_folder(hf, CFG, params)
  gin_file = os.path.join(root, "loop.gin")
  with open(gin_file, "w") as f:
    f.write(f"Experiment.pool = {pool!r}\nExperiment.tasks = [{TASK!r}]\n"
            "Experiment.max_examples = 4\nExperiment.greedy_soup = False\n"
            "Experiment.save_merged = False\nSearchConfig.budget = 7\n")
  run = os.path.join(root, "run")
  assert cli.main(["search", f"--workdir={run}", f"--gin_file={gin_file}",
                   "--log_level=error"]) == 0
  hf_pool_dir = os.path.join(root, "hf_pool")
  tok = os.path.join(root, "hf_tokenizer")  # a BPE tokenizer of the model's vocabulary
  hf_fixtures.train_bpe(tok, vocab_size=CFG.vocab_size)  # size: eval reads the members
  folders = {}
  for i, n in enumerate("abc"):  # shards of a few KiB: an index and several files each
    folders[n] = os.path.join(hf_pool_dir, n)
    hf_folder.save_folder(folders[n], CFG, jax.tree.map(np.asarray, transformer.init_params(
        CFG, jax.random.key(i))), shard_bytes=HF_SHARD_BYTES)
    for name in os.listdir(tok):
      shutil.copy(os.path.join(tok, name), folders[n])
  hf_pool = write_manifest(os.path.join(hf_pool_dir, "pool.json"), folders)
  merge_yml = os.path.join(root, "merge.yml")
  with open(merge_yml, "w") as f:
    yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": p, "parameters": {"weight": 1.0}} for p in folders.values()]}, f)
  task_gin = _write_task(os.path.join(root, "task"))
  for d, _, files in os.walk(root):
    os.chmod(d, 0o755)
    for f in files:
      os.chmod(os.path.join(d, f), 0o644)
  w = World(root, pool, hf, run, gin_file, hf_pool, merge_yml, task_gin)
  if keep:
    json.dump(dataclasses.asdict(w), open(os.path.join(root, "world.json"), "w"))
  return w


HF_SHARD_BYTES = 8 << 10
TASK_JSONL = "u_fault"


def _write_task(d: str) -> str:
  """A JSONL task (exact match of `a` after `q = `): its files in `d`, its gin file."""
  os.makedirs(d, exist_ok=True)
  rows = [{"q": f"{a}+{b}", "a": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 1), (2, 2))]
  for split, part in (("dev", rows[:2]), ("test", rows[2:])):
    with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in part))
  return _task_gin(d)


def _task_gin(d: str) -> str:
  """The gin file declaring TASK_JSONL over d/dev.jsonl and d/test.jsonl."""
  path = os.path.join(d, "task.gin")
  with open(path, "w") as f:
    f.write(f"jsonl_tasks.tasks = [@fq/JsonlTask()]\nfq/JsonlTask.name = {TASK_JSONL!r}\n"
            f"fq/JsonlTask.splits = {{'dev': {os.path.join(d, 'dev.jsonl')!r}, "
            f"'test': {os.path.join(d, 'test.jsonl')!r}}}\n"
            "fq/JsonlTask.prompt = '{q} = '\nfq/JsonlTask.kind = 'exact'\n"
            "fq/JsonlTask.target = '{a}'\n")
  return path


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Setup:
  """What a case runs and what it must leave as it was."""
  argv: list
  culprits: tuple  # the error line names at least one of these
  inputs: list  # files and trees checksummed before and after
  outputs: list  # must not exist afterwards (nor temp siblings of them)
  as_user: int | None = None  # run with this effective uid (permission faults)


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  command: str
  build: Callable[[World, str], Setup]  # (world, a fresh directory) -> Setup
  needs: str = ""  # a capability: 'mount' (tmpfs), 'setuid'

  def __repr__(self) -> str:
    return self.id


LOG = "--log_level=error"


def _base(command: str, w: World, tmp: str) -> Setup:
  """A good invocation of `command` with its inputs and outputs."""
  out = os.path.join(tmp, "out")
  if command in ("merge", "merge-streaming", "merge-hf"):
    extra = {"merge-streaming": ["--streaming", "--no_fsync"],
             "merge-hf": ["--format=hf"]}.get(command, [])
    return Setup(["merge", f"--pool={w.pool}", "--weights=1,1,1", f"--output={out}", *extra,
                  LOG], (), [w.pool_dir], [out])
  if command == "merge-config":
    return Setup(["merge", f"--config={w.merge_yml}", f"--output={out}", "--no_fsync", LOG],
                 (), [w.hf_pool_dir, w.merge_yml], [out])
  if command == "search":
    return Setup(["search", f"--workdir={out}", f"--gin_file={w.gin}", LOG], (),
                 [w.pool_dir, w.gin], [out])
  if command == "eval":
    scores = os.path.join(tmp, "scores.json")
    return Setup(["eval", f"--checkpoint={w.member('a')}", f"--tasks={TASK}",
                  "--max_examples=4", f"--output={scores}", LOG], (), [w.member("a")],
                 [scores])
  if command == "convert":
    return Setup(["convert", w.hf, out, LOG], (), [w.hf], [out])
  if command == "inspect":
    return Setup(["inspect", w.pool, LOG], (), [w.pool_dir], [])
  if command == "report":
    run = os.path.join(tmp, "run")
    shutil.copytree(w.run, run, ignore=shutil.ignore_patterns("search_state", "report.md"))
    return Setup(["report", run, LOG], (), [os.path.join(run, "results.json")],
                 [os.path.join(run, "report.md")])
  if command == "make-pool":
    gin_file = os.path.join(tmp, "tiny_pool.gin")
    with open(gin_file, "w") as f:
      f.write(TINY_POOL_GIN)
    return Setup(["make-pool", f"--workdir={out}", f"--gin_file={gin_file}", LOG], (),
                 [gin_file], [out])
  raise KeyError(command)


# One training step per stage, four eval examples: make-pool in seconds when it runs.
TINY_POOL_GIN = """
make_pool.model = @ModelConfig()
ModelConfig.d_model = 16
ModelConfig.num_layers = 1
ModelConfig.num_heads = 2
ModelConfig.num_kv_heads = 1
ModelConfig.d_ff = 32
make_pool.seq_len = 32
make_pool.batch_size = 2
make_pool.eval_tasks = ['rj_knowledge']
make_pool.max_eval_examples = 4
make_pool.base_stages = [{'mix': {'rj_knowledge': 1.0}, 'steps': 1, 'lr': 0.001}]
make_pool.recipes = [{'name': 'x', 'stages': [{'mix': {'rj_knowledge': 1.0}, 'steps': 1,
                                               'lr': 0.001}]}]
text_corpus.max_code_bytes = 1000
"""

COMMANDS = ("make-pool", "search", "merge", "merge-streaming", "merge-hf", "merge-config",
            "eval", "convert", "inspect", "report")
PARSER_OF = {"merge-streaming": "merge", "merge-hf": "merge", "merge-config": "merge"}
# Variants of a command whose flags are its parser's, generated once (for "merge").
SAME_FLAGS = ("merge-hf", "merge-config")


def _with_flag(argv: list, flag: str, value) -> list:
  """argv with --flag=value replacing any earlier value (value None: the flag dropped)."""
  out = [a for a in argv if not (a == flag or a.startswith(flag + "="))]
  return out if value is None else out + [f"{flag}={value}"]


def _case(command: str, kind: str, detail: str, edit: Callable[[Setup, World, str], None],
          needs: str = "") -> Case:
  def build(w: World, tmp: str) -> Setup:
    s = _base(command, w, tmp)
    edit(s, w, tmp)
    return s
  return Case(f"{command}:{kind}:{detail}", command, build, needs)


# ----------------------------------------------------------------------------- flags

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  for a in parser._actions:  # noqa: SLF001 (argparse has no public API for this)
    if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
      return dict(a.choices)
  return {}


def _numbers(flag: str, kind) -> list:
  from recycle_jax.runtime import validation
  vals = ["x", ""] + (["nan", "inf", "-inf", "1e999"] if kind is float else ["1.5"])
  bound = validation.BOUNDS.get(flag)
  if bound is not None:
    vals += [repr(v) if isinstance(v, float) else str(v) for v in bound.bad_values()
             if v is not None and not (isinstance(v, float) and not math.isfinite(v))]
  return list(dict.fromkeys(vals))


def flag_cases() -> list[Case]:
  from recycle_jax import cli
  subs = _subparsers(cli.build_parser())
  out = []
  for command in (c for c in COMMANDS if c not in SAME_FLAGS):
    p = subs[PARSER_OF.get(command, command)]
    for a in p._actions:  # noqa: SLF001
      flag = max(a.option_strings, key=len) if a.option_strings else None
      if flag in (None, "--help") or a.dest in ("gin_file", "gin_bindings"):
        continue
      values = []
      if a.type in (int, float):
        values = _numbers(flag, a.type)
      elif a.choices:
        values = ["nope"]
      elif isinstance(a, argparse._StoreTrueAction):  # noqa: SLF001
        values = ["yes"]
      for v in values:
        out.append(_case(command, "flag", f"{flag}={v}",
                         lambda s, w, t, flag=flag, v=v: (
                             s.argv.__setitem__(slice(None), _with_flag(s.argv, flag, v)),
                             setattr(s, "culprits", (flag,)))))
      if a.required:
        out.append(_case(command, "flag", f"{flag}-missing",
                         lambda s, w, t, flag=flag: (
                             s.argv.__setitem__(slice(None), _with_flag(s.argv, flag, None)),
                             setattr(s, "culprits", (flag,)))))
    out.append(_case(command, "flag", "--no_such_flag", lambda s, w, t: (
        s.argv.append("--no_such_flag=1"), setattr(s, "culprits", ("--no_such_flag",)))))
  return out


def weights_cases() -> list[Case]:
  """--weights against a pool of 3: counts, non-finite, signs, text."""
  out = []
  for command in ("merge", "merge-streaming"):
    for v in ("1,1", "1,1,1,1", "nan,1,1", "inf,1,1", "1e999,1,1", "-1,1,1", "0,0,0", "a,b,c",
              "", "1,,1"):
      out.append(_case(command, "flag", f"--weights={v}", lambda s, w, t, v=v: (
          s.argv.__setitem__(slice(None), _with_flag(s.argv, "--weights", v)),
          setattr(s, "culprits", ("--weights",)))))
  return out


# Path-valued arguments: (command, flag or positional index, expects 'dir' | 'file' | 'out')
PATHS = [("merge", "--pool", "file"), ("merge", "--base", "dir"), ("merge", "--gin_file", "file"),
         ("merge-config", "--config", "file"),
         ("merge-streaming", "--pool", "file"), ("search", "--gin_file", "file"),
         ("eval", "--checkpoint", "dir"), ("convert", 1, "dir"), ("inspect", 1, "file"),
         ("report", 1, "dir"), ("make-pool", "--gin_file", "file")]


def _set_path(s: Setup, where, value: str) -> None:
  if isinstance(where, int):
    s.argv[where] = value
  else:
    s.argv[:] = _with_flag(s.argv, where, value)


def path_cases() -> list[Case]:
  def missing(t): return os.path.join(t, "missing")
  def a_file(t):
    p = os.path.join(t, "a_file")
    open(p, "w").write("not what was asked for\n")
    return p
  def a_dir(t):
    os.makedirs(os.path.join(t, "a_dir", "sub"), exist_ok=True)
    return os.path.join(t, "a_dir")
  def empty_dir(t):
    os.makedirs(os.path.join(t, "empty"), exist_ok=True)
    return os.path.join(t, "empty")
  def under_file(t): return os.path.join(a_file(t), "x")
  makers = {"missing": missing, "under_a_file": under_file, "empty_dir": empty_dir}
  out = []
  for command, where, kind in PATHS:
    wrong = {"dir": {"a_file": a_file}, "file": {"a_dir": a_dir, "empty_file": lambda t: (
        open(os.path.join(t, "empty_file"), "w").close() or os.path.join(t, "empty_file"))}}
    for name, make in {**makers, **wrong[kind]}.items():
      if kind == "file" and name == "empty_dir":
        continue
      def edit(s, w, t, where=where, make=make):
        p = make(t)
        _set_path(s, where, p)
        s.culprits = (p,) + ((where,) if isinstance(where, str) else ())
      out.append(_case(command, "path", f"{where}={name}", edit))
  return out


# ----------------------------------------------------------------------------- gin

def _wrong_values(hint) -> list[str]:
  """gin literals of another type than `hint` (two at most)."""
  import gin
  from recycle_jax.runtime import validation
  out = []
  for text in ("'x'", "3", "1.5", "True", "[1]", "None", "{'a': 1}"):
    value = gin.config.parse_value(text)
    if not validation.matches(value, hint):
      out.append(text)
  return out[:2]


def import_all() -> None:
  """Every module of the package, so gin's registry holds every configurable."""
  import importlib
  import pkgutil
  import recycle_jax
  for m in pkgutil.iter_modules(recycle_jax.__path__):
    importlib.import_module(f"recycle_jax.{m.name}")


def _gin_literal(v) -> str:
  if v is None:
    return "None"
  if isinstance(v, float) and math.isinf(v):
    return "1e999" if v > 0 else "-1e999"
  return repr(v)


def _defaults(fn) -> set[str]:
  import inspect
  target = fn.__init__ if inspect.isclass(fn) else fn
  return {k for k, p in inspect.signature(inspect.unwrap(target)).parameters.items()
          if p.default is not inspect.Parameter.empty}


def gin_cases() -> list[Case]:
  import gin
  from recycle_jax.runtime import validation
  import_all()
  out = []
  for selector, configurable in sorted(gin.config._REGISTRY.items()):  # noqa: SLF001
    if not configurable.wrapped.__module__.startswith("recycle_jax."):
      continue
    short = selector.split(".")[-1]
    hints = validation.hints(configurable.wrapped)
    pool_only = configurable.wrapped.__module__.endswith(("pools", "training"))
    command = "make-pool" if pool_only else "search"
    defaults = _defaults(configurable.wrapped)
    for param, hint in sorted(hints.items()):
      if param not in defaults:  # call arguments, not configuration
        continue
      name = f"{short}.{param}"
      bad = _wrong_values(hint)[:1]
      if name in validation.BOUNDS:
        bad += [_gin_literal(v) for v in validation.BOUNDS[name].bad_values()
                if not (isinstance(v, float) and math.isnan(v))  # gin has no NaN literal
                and not (v is None and validation.matches(None, hint))]
      for text in dict.fromkeys(bad):
        out.append(_case(command, "gin", f"{name}={text}", lambda s, w, t, name=name, text=text: (
            s.argv.insert(-1, f"--gin_bindings={name} = {text}"),
            setattr(s, "culprits", (name,)))))
  return out


# ----------------------------------------------------------------------------- file bytes

def _mutations(data: bytes) -> dict[str, bytes | None]:
  """Raw damage to a file's bytes (None: the file deleted)."""
  n = len(data)
  rng = np.random.default_rng(n)
  out = {"deleted": None, "empty": b"", "garbage": rng.integers(0, 256, max(n, 16),
                                                                np.uint8).tobytes()}
  for frac in (1 / 3, 1 / 2, 9 / 10):
    cut = int(n * frac)
    if 0 < cut < n:
      out[f"truncated@{cut}"] = data[:cut]
  return out


def _json_mutations(data: bytes, fields: tuple[tuple, ...]) -> dict[str, bytes]:
  """Damage that keeps a file JSON-ish: encodings, top-level types, fields' types and
  sizes (fields: key paths into the document)."""
  out = {"not-utf8": b"\xff\xfe\xfa" + data, "utf16": data.decode().encode("utf-16"),
         "top-list": b"[]", "top-string": b'"x"', "top-number": b"3", "top-null": b"null",
         "nan-token": data.replace(b"{", b'{"__nan__": NaN, ', 1), **_hostile_json(data)}
  out.update(_field_mutations(json.loads(data), fields, lambda d: json.dumps(d).encode()))
  return out


DEEP = 100_000  # levels of nesting of a hostile document (Python's parsers recurse)
HUGE = "1" + "0" * 400  # beyond float range


def _hostile_json(data: bytes) -> dict[str, bytes]:
  """Valid JSON that no reader should take: nested past any bound, a number beyond float
  range, a lone surrogate escaped into a string (each as a field added to the object)."""
  add = lambda field: data.replace(b"{", b"{" + field + b", ", 1)  # noqa: E731
  return {"deep-nesting": add(b'"__deep__": ' + b"[" * DEEP + b"]" * DEEP),
          "huge-number": add(b'"__huge__": ' + HUGE.encode()),
          "lone-surrogate": add(b'"__text__": "\\ud800"')}


def _hostile_yaml(data: bytes) -> dict[str, bytes]:
  """YAML that no reader should take: an alias bomb (9 levels of 9 aliases: 387 M nodes
  expanded), nesting past any bound, a number beyond float range."""
  bomb = b'__a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
      f"__a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n".encode() for i in range(1, 10))
  return {"alias-bomb": bomb + data, "deep-nesting": b"__deep__: " + b"[" * DEEP +
          b"]" * DEEP + b"\n" + data, "huge-number": b"__huge__: " + HUGE.encode() + b"\n" + data}


def _lying_headers(data: bytes) -> dict[str, bytes]:
  """A safetensors file whose header lies, each damage where the file allows it: a float32
  weight declared I32 (same byte size: read as integers), a tensor's byte range moved onto
  the first tensor's (two tensors share bytes)."""
  n = int.from_bytes(data[:8], "little")
  header, body = json.loads(data[8:8 + n]), data[8 + n:]
  def dump(h):
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body
  names = sorted((k for k in header if k != "__metadata__"),
                 key=lambda k: header[k]["data_offsets"])
  out = {}
  lie = next((k for k in names if k.endswith(".weight") and header[k]["dtype"] == "F32"), None)
  if lie:
    out["dtype-lie"] = dump({**header, lie: {**header[lie], "dtype": "I32"}})
  sized = [k for k in names if header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
  if len(sized) >= 2:
    first, moved = header[sized[0]]["data_offsets"][0], header[sized[1]]
    size = moved["data_offsets"][1] - moved["data_offsets"][0]
    out["overlapping-ranges"] = dump({**header, sized[1]: {
        **moved, "data_offsets": [first, first + size]}})
  return out


def _field_mutations(doc, fields: tuple[tuple, ...], dump: Callable) -> dict[str, bytes]:
  """The document dumped with one field (a key path) of another type or size at a time."""
  out = {}
  for path in fields:
    parent = doc
    for k in path[:-1]:
      parent = parent[k]
    old = parent[path[-1]]
    kinds = {"str": "x", "list": [1], "null": None} if isinstance(old, (int, float)) else \
        {"int": 3, "dict": {"a": 1}}
    if isinstance(old, str):
      kinds["huge"] = "x" * 100_000
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
      kinds.update(huge=10 ** 30, negative=-1)
    for kind, value in kinds.items():
      if type(value) is type(old) and value == old:
        continue
      if isinstance(old, bool) and kind == "int":
        continue
      parent[path[-1]] = value
      out[f"{'.'.join(map(str, path))}={kind}"] = dump(doc)
    parent[path[-1]] = old
  return out


def _damage(path: str, data: bytes | None) -> None:
  if data is None:
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(data)


def _copied_pool(w: World, tmp: str, pool: str | None = None) -> str:
  """A private copy of the tiny pool, or `pool` (its manifest's paths into the copy)."""
  pool = pool or w.pool
  dst = os.path.join(tmp, "pool")
  shutil.copytree(os.path.dirname(pool), dst)
  doc = json.load(open(pool))
  for e in doc["checkpoints"]:
    e["path"] = os.path.basename(e["path"])  # into the copy
  with open(os.path.join(dst, "pool.json"), "w") as f:
    json.dump(doc, f)
  return os.path.join(dst, "pool.json")


def _hf_copy(w: World, tmp: str) -> str:
  dst = os.path.join(tmp, "hf")
  shutil.copytree(w.hf, dst)
  return dst


POOL_FIELDS = (("checkpoints",), ("checkpoints", 0), ("checkpoints", 0, "name"),
               ("checkpoints", 1, "path"))
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
             "tie_word_embeddings", "hidden_act", "model_type", "dtype", "max_position_embeddings")
RESULTS_FIELDS = (("methods",), ("pool",), ("tasks",), ("history",), ("methods", "search"),
                  ("methods", "search", "weights"))


def _checkpoint_files(path: str) -> dict[str, str]:
  """{stable label: relative path} of a checkpoint's files. Data files have random names:
  labelled by their place in size order. Orbax's commit marker carries nothing."""
  rels = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path)
                for f in fs if f != "commit_success.txt")
  out, by_dir = {}, {}
  for r in rels:
    by_dir.setdefault(os.path.dirname(r), []).append(r)
  for d, rs in by_dir.items():
    if os.path.basename(d) == "d":  # data files: random names
      rs = sorted(rs, key=lambda r: (os.path.getsize(os.path.join(path, r)), r))
      out.update({f"{d}/#{i}": r for i, r in enumerate(rs)})
    else:
      out.update({r: r for r in rs})
  return out


def _raw_and_json(data: bytes, is_json: bool) -> dict[str, bytes | None]:
  muts = _mutations(data)
  muts = {k: v for k, v in muts.items() if not k.startswith("truncated") or
          k == sorted(m for m in muts if m.startswith("truncated"))[len(
              [m for m in muts if m.startswith("truncated")]) // 2]}  # one cut: the middle
  if is_json:
    j = _json_mutations(data, ())
    muts.update({k: j[k] for k in ("not-utf8", "top-list")})
  return muts


def _restore(path: str):
  from recycle_jax.checkpoint_io import checkpoints
  return checkpoints.restore_local(path)


def _fails(root: str, rel: str, data: bytes | None, read: Callable[[str], object]) -> bool:
  """Whether `read(copy of root)` fails with `rel` damaged to `data` (None: deleted). A
  read that succeeds but returns something else than the intact root's also counts: that
  would be a silently wrong result, which the case must then catch."""
  hook, sys.unraisablehook = sys.unraisablehook, lambda u: None  # Orbax's abandoned reads
  tmp = tempfile.mkdtemp()
  try:
    copy = os.path.join(tmp, "x")
    shutil.copytree(root, copy)
    _damage(os.path.join(copy, rel), data)
    got = read(copy)
    return not _same(got, read(root))
  except BaseException:  # noqa: BLE001 (any refusal or crash means the file is read)
    return True
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    gc.collect()
    sys.unraisablehook = hook


def _same(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def _used(root: str, rel: str, read: Callable[[str], object]) -> str:
  """'' when `read(copy of root)` succeeds with the file deleted and with it garbled (no
  reader needs it: damage there is no fault), 'optional' when only garbling it fails,
  'needed' otherwise."""
  deleted, garbled = (_fails(root, rel, d, read) for d in (None, b"\x00garbage\xff" * 8))
  return "needed" if deleted else ("optional" if garbled else "")


def file_cases() -> list[Case]:
  from recycle_jax.search import loop
  w = world()
  out = []

  def member_case(command, label, rel, kind, data):
    def edit(s, w, t):
      pool = _copied_pool(w, t)
      b = os.path.join(os.path.dirname(pool), "b")
      _damage(os.path.join(b, _checkpoint_files(b)[label]), data)
      if command == "eval":
        s.argv[:] = _with_flag(s.argv, "--checkpoint", b)
      elif command == "convert":
        s.argv[1] = b
      elif command == "inspect":
        s.argv[1] = pool
      elif command == "search":
        s.argv.insert(-1, f"--gin_bindings=Experiment.pool = {pool!r}")
      else:
        s.argv[:] = _with_flag(s.argv, "--pool", pool)
      s.inputs = [os.path.dirname(pool)] + s.inputs
      s.culprits = (b, "'b'")
    return _case(command, "checkpoint", f"{label}:{kind}", edit)

  # Every file of a member that a reader needs, every damage, each pair on one command in
  # turn (all commands see every kind of damage; the whole matrix would cost 6x as much).
  b = w.member("b")
  turn = 0
  for label, rel in _checkpoint_files(b).items():
    used = _used(b, rel, lambda p: _restore(p))
    if not used:
      continue  # (OCDBT's per-process files, once merged into the top-level database)
    data = open(os.path.join(b, rel), "rb").read()
    metadata_only = "/d/" not in f"/{label}"
    commands = ["merge", "merge-streaming", "search", "eval", "convert"] + (
        ["inspect"] if metadata_only else [])  # inspect reads metadata only
    for kind, d in _raw_and_json(data, rel.endswith("METADATA")).items():
      if kind == "deleted" and used == "optional":
        continue
      # An OCDBT data file can end in bytes no manifest references (superseded nodes):
      # a cut there leaves the checkpoint whole, and reading it is right.
      if kind.startswith("truncated") and not _fails(b, rel, d, _restore):
        continue
      out.append(member_case(commands[turn % len(commands)], label, rel, kind, d))
      turn += 1

  # The manifest.
  data = open(w.pool, "rb").read()
  commands = ("merge", "merge-streaming", "search", "inspect")
  for i, (kind, d) in enumerate({**_mutations(data),
                                 **_json_mutations(data, POOL_FIELDS)}.items()):
    for command in commands[i % len(commands):][:1]:
      def edit(s, w, t, command=command, d=d):
        pool = _copied_pool(w, t)
        _damage(pool, d)
        if command == "search":
          s.argv.insert(-1, f"--gin_bindings=Experiment.pool = {pool!r}")
        elif command == "inspect":
          s.argv[1] = pool
        else:
          s.argv[:] = _with_flag(s.argv, "--pool", pool)
        s.inputs = [os.path.dirname(pool)] + s.inputs
        s.culprits = (pool,)
      out.append(_case(command, "manifest", kind, edit))

  # A duplicate checkpoint: the same directory listed twice.
  for command in ("merge", "merge-streaming", "search"):
    def edit(s, w, t, command=command):
      doc = json.load(open(w.pool))
      doc["checkpoints"].append({"name": "a2", "path": doc["checkpoints"][0]["path"]})
      pool = os.path.join(t, "pool.json")
      json.dump({"checkpoints": [{**e, "path": os.path.join(w.pool_dir, e["path"])}
                                 for e in doc["checkpoints"]]}, open(pool, "w"))
      if command == "search":
        s.argv.insert(-1, f"--gin_bindings=Experiment.pool = {pool!r}")
      else:
        s.argv[:] = _with_flag(s.argv, "--pool", pool) + ["--weights=1,1,1,1"]
      s.inputs.append(pool)
      s.culprits = ("'a2'", "'a'")
    out.append(_case(command, "manifest", "duplicate-checkpoint", edit))

  # Hugging Face folder: config.json and the weights file.
  config = open(os.path.join(w.hf, "config.json"), "rb").read()
  doc = json.loads(config)
  fields = tuple((k,) for k in HF_FIELDS if k in doc)
  for kind, d in {**_mutations(config), **_json_mutations(config, fields)}.items():
    def edit(s, w, t, d=d):
      hf = _hf_copy(w, t)
      _damage(os.path.join(hf, "config.json"), d)
      s.argv[1], s.inputs, s.culprits = hf, [hf], (os.path.join(hf, "config.json"), hf)
    out.append(_case("convert", "hf-config", kind, edit))
  weights = open(os.path.join(w.hf, "model.safetensors"), "rb").read()
  for kind, d in {**_mutations(weights), **IMPOSTORS, **_lying_headers(weights)}.items():
    def edit(s, w, t, d=d):
      hf = _hf_copy(w, t)
      _damage(os.path.join(hf, "model.safetensors"), d)
      s.argv[1], s.inputs = hf, [hf]
      s.culprits = (os.path.join(hf, "model.safetensors"), "model.safetensors")
    out.append(_case("convert", "hf-weights", kind, edit))

  def pickled(s, w, t):  # a torch-style weights file only: refused, never unpickled
    hf = _hf_copy(w, t)
    os.rename(os.path.join(hf, "model.safetensors"), os.path.join(hf, "pytorch_model.bin"))
    s.argv[1], s.inputs, s.culprits = hf, [hf], ("pytorch_model.bin", ".bin")
  out.append(_case("convert", "hf-weights", "only-pytorch_model.bin", pickled))

  # results.json for report.
  results = open(os.path.join(w.run, "results.json"), "rb").read()
  for kind, d in {**_mutations(results), **_json_mutations(results, RESULTS_FIELDS)}.items():
    def edit(s, w, t, d=d):
      p = s.inputs[0]
      _damage(p, d)
      s.culprits = (p, "results.json")
    out.append(_case("report", "results", kind, edit))

  # The saved search state, for --resume.
  state = os.path.join(w.run, "search_state")
  latest = max(int(x) for x in os.listdir(state) if x.isdigit())
  files = {**{f"latest/{k}": os.path.join(str(latest), v) for k, v in
              _checkpoint_files(os.path.join(state, str(latest))).items()},
           "signature.json": "signature.json"}
  sig = json.load(open(os.path.join(state, "signature.json")))
  for label, rel in files.items():
    used = _used(state, rel, lambda p: loop.check_saved_state(p, sig))
    if not used:
      continue
    data = open(os.path.join(state, rel), "rb").read()
    muts = _raw_and_json(data, rel.endswith((".json", "METADATA")))
    for kind, d in muts.items():
      if kind == "deleted" and used == "optional":
        continue
      def edit(s, w, t, label=label, d=d):
        run = os.path.join(t, "out")
        shutil.copytree(w.run, run)
        st = os.path.join(run, "search_state")
        rel = ("signature.json" if label == "signature.json" else os.path.join(
            str(latest), _checkpoint_files(os.path.join(st, str(latest)))[label[7:]]))
        _damage(os.path.join(st, rel), d)
        s.argv.insert(-1, "--resume")
        s.inputs, s.outputs = [run] + s.inputs, []
        s.culprits = (os.path.join(st, rel), os.path.join(st, rel.split(os.sep)[0]), st)
      out.append(_case("search", "resume-state", f"{label}:{kind}", edit))
  return out


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _hf_member_files(folder: str) -> dict[str, str]:
  """{label: file} of a Hugging Face folder: config.json, the index, the tokenizer's
  files, shards by size."""
  names = sorted(os.listdir(folder))
  shards = sorted((n for n in names if n.endswith(".safetensors")),
                  key=lambda n: (os.path.getsize(os.path.join(folder, n)), n))
  out = {n: n for n in ("config.json", "model.safetensors.index.json", *HF_TOKENIZER_FILES)
         if n in names}
  out.update({f"shard#{i}": n for i, n in enumerate(shards)})
  return out


IMPOSTORS = {"pickle": b"\x80\x04\x95" + bytes(64), "zip": b"PK\x03\x04" + bytes(64),
             "json": b'{"a": 1}', "huge-header": (2 ** 62).to_bytes(8, "little") + b"{}",
             "header-not-json": (4).to_bytes(8, "little") + b"abcd" + bytes(16)}


def hf_member_cases() -> list[Case]:
  """Member b of a pool of Hugging Face folders: its config.json (bytes, fields), its
  index, its tokenizer's files (bytes, encodings) and its shards (bytes, impostors), each
  damage on one reader in turn (eval evaluates the member alone)."""
  w = world()
  b = os.path.join(w.hf_pool_dir, "b")
  out, turn = [], 0
  for label, name in _hf_member_files(b).items():
    data = open(os.path.join(b, name), "rb").read()
    if name in HF_TOKENIZER_FILES:  # (inspect does not read the tokenizer)
      damage = {**_mutations(data), **_json_mutations(data, ())}
      readers = ["eval", "merge", "merge-streaming", "merge-config"]
    elif name.endswith(".json"):
      doc = json.loads(data)
      fields = tuple((k,) for k in HF_FIELDS if k in doc) if name == "config.json" else \
          (("weight_map",),)
      damage = {**_mutations(data), **_json_mutations(data, fields)}
      readers = ["merge", "merge-streaming", "merge-config", "inspect", "eval"]
    else:
      damage = {**_raw_and_json(data, False), **IMPOSTORS, **_lying_headers(data)}
      readers = ["merge", "merge-streaming", "merge-config", "eval"]  # (inspect: headers)
    for kind, d in damage.items():
      command = readers[turn % len(readers)]
      turn += 1

      def edit(s, w, t, command=command, name=name, d=d):
        pool = _copied_pool(w, t, w.hf_pool)
        copy = os.path.dirname(pool)
        _damage(os.path.join(copy, "b", name), d)
        _use_pool(s, command, pool)
        s.inputs = [copy] + s.inputs
        s.culprits = (os.path.join(copy, "b"), "'b'")
      out.append(_case(command, "hf-member", f"{label}:{kind}", edit))
  return out


def _use_pool(s: Setup, command: str, pool: str) -> None:
  """Points a command at a pool of Hugging Face folders (member b where it takes one)."""
  copy = os.path.dirname(pool)
  if command == "eval":
    s.argv[:] = _with_flag(s.argv, "--checkpoint", os.path.join(copy, "b"))
  elif command == "inspect":
    s.argv[1] = pool
  elif command == "merge-config":
    cfg = yaml.safe_load(open(s.argv[1].split("=", 1)[1]))
    for m, n in zip(cfg["models"], "abc"):
      m["model"] = os.path.join(copy, n)
    path = os.path.join(copy, "merge.yml")
    with open(path, "w") as f:
      yaml.safe_dump(cfg, f)
    s.argv[1] = f"--config={path}"
  else:
    s.argv[:] = _with_flag(s.argv, "--pool", pool)
    if command == "merge-streaming":  # Hugging Face folders stream into one
      s.argv.insert(-1, "--format=hf")


MERGEKIT_FIELDS = (("merge_method",), ("dtype",), ("models",), ("models", 0),
                   ("models", 0, "model"), ("models", 1, "parameters"),
                   ("models", 1, "parameters", "weight"))


def mergekit_cases() -> list[Case]:
  """`merge --config`: the YAML's bytes and its fields' types."""
  w = world()
  data = open(w.merge_yml, "rb").read()
  doc = yaml.safe_load(data)
  damage = {**_mutations(data), "not-utf8": b"\xff\xfe\xfa" + data, "top-list": b"[]\n",
            "top-string": b"x\n", "tab-indent": data.replace(b"\n  ", b"\n\t", 1),
            **_field_mutations(doc, MERGEKIT_FIELDS, lambda d: yaml.safe_dump(d).encode()),
            **_hostile_yaml(data)}
  for kind in ("list", "huge", "negative"):  # a weight may be any finite real, or a
    damage.pop(f"models.1.parameters.weight={kind}")  # list (a gradient over layers)
  out = []
  for kind, d in damage.items():
    def edit(s, w, t, d=d):
      p = os.path.join(t, "merge.yml")
      shutil.copyfile(w.merge_yml, p)
      _damage(p, d)
      s.argv[1] = f"--config={p}"
      s.inputs.append(p)
      s.culprits = (p,)
    out.append(_case("merge-config", "mergekit-config", kind, edit))
  return out


def jsonl_cases() -> list[Case]:
  """A JSONL task file: its bytes, and lines that are not JSON objects or lack a field;
  for the commands that read tasks (eval, search), in turn."""
  data = open(os.path.join(os.path.dirname(world().task_gin), "dev.jsonl"), "rb").read()
  first = data.split(b"\n")[0]
  damage = {k: v for k, v in _mutations(data).items()  # (a cut after a whole line is
            if v is None or not v.endswith(b"\n")}     # a shorter, valid file)
  damage.update({"not-utf8": b"\xff\xfe\xfa" + data,
                 "line-not-json": data + b"{broken\n", "line-not-object": data + b"[1, 2]\n",
                 "line-missing-field": data + first.replace(b'"a"', b'"z"') + b"\n",
                 "blank-only": b"\n\n"})
  damage.update({k: data + v + b"\n" for k, v in _hostile_json(first).items()})
  out = []
  for i, (kind, d) in enumerate(damage.items()):
    command = ("eval", "search")[i % 2]

    def edit(s, w, t, command=command, d=d):
      d_task = os.path.join(t, "task")
      shutil.copytree(os.path.dirname(w.task_gin), d_task)
      gin_file = _task_gin(d_task)
      path = os.path.join(d_task, "dev.jsonl")
      _damage(path, d)
      s.argv.insert(-1, f"--gin_file={gin_file}")
      if command == "eval":
        s.argv[:] = _with_flag(s.argv, "--tasks", TASK_JSONL) + ["--split=dev"]
      else:
        s.argv.insert(-1, f"--gin_bindings=Experiment.tasks = [{TASK_JSONL!r}]")
      s.inputs.append(d_task)
      s.culprits = (path,)
    out.append(_case(command, "jsonl-task", kind, edit))
  return out


# ----------------------------------------------------------------------------- outputs

OUTPUT_FLAG = {"merge": "--output", "merge-streaming": "--output", "merge-hf": "--output",
               "merge-config": "--output", "eval": "--output",
               "search": "--workdir", "make-pool": "--workdir", "convert": 2}
OVERWRITES = {"merge", "merge-streaming", "merge-hf", "merge-config", "search", "convert"}


def _set_output(s: Setup, command: str, path: str) -> None:
  _set_path(s, OUTPUT_FLAG[command], path)
  s.outputs = [path]
  s.culprits = (OUTPUT_FLAG[command],) if isinstance(OUTPUT_FLAG[command], str) else (path,)


def _input_targets(command: str, w: World, s: Setup) -> dict[str, str]:
  """Outputs that would destroy an input: the input itself, inside it, or around it."""
  if command == "merge-config":
    a = os.path.join(w.hf_pool_dir, "a")
    return {"is-model": a, "inside-model": os.path.join(a, "sub"),
            "contains-models": w.hf_pool_dir, "is-config": w.merge_yml,
            "is-model-file": os.path.join(a, "config.json")}
  if command in ("merge", "merge-streaming", "merge-hf", "search"):
    a = w.member("a")
    t = {"is-member": a, "inside-member": os.path.join(a, "sub"), "contains-pool": w.pool_dir,
         "is-manifest": w.pool, "inside-manifest": os.path.join(w.pool, "x")}
    if command == "search":
      t["is-gin-file"] = w.gin
    return t
  if command == "eval":
    a = w.member("a")
    return {"is-checkpoint": a, "inside-checkpoint": os.path.join(a, "scores.json"),
            "is-checkpoint-file": os.path.join(a, "_CHECKPOINT_METADATA")}
  if command == "convert":
    return {"is-src": w.hf, "inside-src": os.path.join(w.hf, "out"),
            "is-src-file": os.path.join(w.hf, "config.json"),
            "contains-src": os.path.dirname(w.hf)}
  if command == "make-pool":
    gin_file = [a for a in s.argv if a.startswith("--gin_file=")][0].split("=", 1)[1]
    return {"is-gin-file": gin_file, "contains-gin-file": os.path.dirname(gin_file)}
  return {}


def output_cases() -> list[Case]:
  out = []
  for command in OUTPUT_FLAG:
    s0 = _base(command, world(), tempfile.mkdtemp())  # the keys only
    for name in _input_targets(command, world(), s0):
      for overwrite in ([False, True] if command in OVERWRITES else [False]):
        def edit(s, w, t, command=command, name=name, overwrite=overwrite):
          target = _input_targets(command, w, s)[name]
          _set_output(s, command, target)
          s.outputs = [] if os.path.exists(target) else [target]
          s.inputs += [w.pool_dir, w.hf, w.gin, w.hf_pool_dir, w.merge_yml]
          if overwrite:
            s.argv.insert(-1, "--overwrite")
        out.append(_case(command, "output", f"{name}{'+overwrite' if overwrite else ''}",
                         edit))

    def exists(s, w, t, command=command):  # an existing output, no --overwrite
      p = os.path.join(t, "existing")
      os.makedirs(p)
      open(os.path.join(p, "keep.txt"), "w").write("an earlier result")
      if command == "eval":
        p = os.path.join(p, "keep.txt")
      _set_output(s, command, p)
      s.inputs, s.outputs = s.inputs + [p], []
    if command != "make-pool":  # make-pool reuses its workdir: a cache
      out.append(_case(command, "output", "exists", exists))

    def workdir_is_file(s, w, t, command=command):
      p = os.path.join(t, "a_file")
      open(p, "w").write("a file")
      _set_output(s, command, p)
      s.inputs, s.outputs = s.inputs + [p], []
      if command in OVERWRITES and command != "convert":
        s.argv.insert(-1, "--overwrite")  # a file is not a workdir, even to overwrite
    if command in ("search", "make-pool"):
      out.append(_case(command, "output", "is-a-file", workdir_is_file))

    def under_file(s, w, t, command=command):
      f = os.path.join(t, "a_file")
      open(f, "w").write("a file")
      _set_output(s, command, os.path.join(f, "out"))
      s.inputs = s.inputs + [f]
      s.culprits += (f,)
    out.append(_case(command, "output", "under-a-file", under_file))

    for fs in ("readonly", "full", "no-inodes"):
      def on_fs(s, w, t, command=command, fs=fs):
        from recycle_jax.runtime.outputs import MIN_INODES
        mnt = os.path.join(t, fs)
        os.makedirs(mnt)
        # out of inodes: none left (refused before any work), or (Orbax outputs) as many
        # as the check asks, fewer than a checkpoint's files (its writes fail midway)
        mount_tmpfs(mnt, readonly=fs == "readonly", inodes=None if fs != "no-inodes" else (
            MIN_INODES if command in ("merge", "merge-streaming", "convert") else 0))
        _set_output(s, command, os.path.join(mnt, "out" if command != "eval" else "s.json"))
        s.culprits += (mnt,)
      out.append(_case(command, "output-fs", fs, on_fs, needs="mount"))

    def held(s, w, t, command=command):  # another live writer of the same output
      _set_output(s, command, os.path.join(t, "out"))
      hold_lock(os.path.join(t, "out"))
      s.culprits = (os.path.join(t, "out.lock"),)
    if command != "eval":  # (a file written whole by a rename: the last writer wins)
      out.append(_case(command, "concurrent", "output-locked", held))

    def in_locked_workdir(s, w, t, command=command):  # a running search's workdir
      run = os.path.join(t, "run")
      os.makedirs(run)
      hold_lock(run)
      _set_output(s, command, os.path.join(run, "merged"))
      s.culprits = (os.path.join(t, "run.lock"),)
    if command.startswith("merge") or command == "convert":
      out.append(_case(command, "concurrent", "inside-locked-workdir", in_locked_workdir))

    def mount_point(s, w, t, command=command):  # an earlier output on its own filesystem
      mnt = os.path.join(t, "mnt")
      os.makedirs(mnt)
      mount_tmpfs(mnt, full=False)
      open(os.path.join(mnt, "keep.txt"), "w").write("an earlier result")
      _set_output(s, command, mnt)
      s.inputs, s.outputs = s.inputs + [mnt], []
      s.argv.insert(-1, "--overwrite")
    if command in OVERWRITES:  # (a file output or a cache is not replaced by a rename)
      out.append(_case(command, "output-fs", "mount-point+overwrite", mount_point,
                       needs="mount"))

    def no_permission(s, w, t, command=command):
      d = os.path.join(t, "locked")
      os.makedirs(d)
      os.chmod(t, 0o755)
      os.chmod(d, 0o555)  # not writable by others
      _set_output(s, command, os.path.join(d, "out"))
      s.culprits += (d,)
      s.as_user = NOBODY
    out.append(_case(command, "output-fs", "no-permission", no_permission, needs="setuid"))
  return out


NOBODY = 65534
SAMPLE_EVERY = 10**6  # `make test` runs the first case of each stratum (see `sample`)
FULL_BYTES = 0  # what a "full" tmpfs has left


@functools.lru_cache(None)
def _other_writer() -> subprocess.Popen:
  """A live process of this host that holds the locks of `hold_lock` (until the session
  ends)."""
  proc = subprocess.Popen(["sleep", "86400"])
  atexit.register(proc.kill)
  return proc


def hold_lock(path: str) -> None:
  """`path`'s lock, taken by another live process (a concurrent writer of `path`)."""
  import socket
  from recycle_jax.runtime import locking
  pid = _other_writer().pid
  with open(locking.lock_path(path), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "since": 0,
               "start": locking.process_start(pid)}, f)


def mount_tmpfs(path: str, readonly: bool = False, full: bool = True,
                inodes: int | None = None) -> None:
  """A small tmpfs at path: read-only, with a few KiB left, (not `full`) with room, or
  with room but only `inodes` files left to create."""
  opts = "ro,size=64k" if readonly else "size=256k" if full and inodes is None else "size=64m"
  if inodes is not None:
    opts += ",nr_inodes=64"
  subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True,
                 capture_output=True, timeout=30)
  if inodes is not None:
    fill = os.path.join(path, ".inodes")
    os.mkdir(fill)
    for i in range(os.statvfs(path).f_favail - inodes):
      open(os.path.join(fill, str(i)), "w").close()
    os.chmod(fill, 0o555)
    return
  if not readonly and full:
    st = os.statvfs(path)
    with open(os.path.join(path, ".filler"), "wb") as f:
      f.write(bytes(max(0, st.f_bavail * st.f_frsize - FULL_BYTES)))
    os.chmod(os.path.join(path, ".filler"), 0o444)


def unmount_all(root: str) -> None:
  with open("/proc/mounts") as f:
    mounts = [line.split()[1] for line in f]
  for m in sorted((m for m in mounts if m.startswith(root.rstrip("/") + "/")), reverse=True):
    subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)


@functools.lru_cache(None)
def can(need: str) -> bool:
  if not need:
    return True
  if need == "setuid":
    return os.geteuid() == 0
  d = tempfile.mkdtemp()
  try:
    mount_tmpfs(d, readonly=True)
    subprocess.run(["umount", d], capture_output=True, timeout=30)
    return True
  except (subprocess.SubprocessError, OSError):
    return False
  finally:
    shutil.rmtree(d, ignore_errors=True)


def stratum(case: Case) -> tuple[str, str]:
  """(command, kind of fault): what a sample must cover."""
  return case.command, case.id.split(":")[1]


def sample(cases: list[Case], every: int = SAMPLE_EVERY) -> list[Case]:
  """A deterministic stratified sample: of each stratum's cases (in generation order),
  the first and every `every`-th after it; every command meets every kind of fault it
  has. `make test` runs the sample, `make test-faults` all of them."""
  by: dict[tuple, list[Case]] = {}
  for c in cases:
    by.setdefault(stratum(c), []).append(c)
  return [c for group in by.values() for c in group[::every]]


def all_cases() -> list[Case]:
  cases = (flag_cases() + weights_cases() + path_cases() + gin_cases() + file_cases() +
           hf_member_cases() + mergekit_cases() + jsonl_cases() + output_cases())
  ids = [c.id for c in cases]
  dup = {i for i in ids if ids.count(i) > 1}
  assert not dup, f"duplicate case ids: {sorted(dup)[:5]}"
  return cases
