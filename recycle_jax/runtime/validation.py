"""Validation at the edge, by type: flags, gin bindings and weight lists are checked before
any work, each refused by its own flag or binding name.

Two registries drive it (and the fault-injection suite, which generates its bad values
from them, so a new entry is tested for free):
  BOUNDS: flag or binding name -> `Bound` (the value's kind and range);
  the annotations of gin's configurables: every bound value must match its parameter's
  type (`Sequence[str]`, `int | None`, ...), whether a range is registered or not.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import types
import typing
from typing import Any, Sequence

from recycle_jax.runtime import waits
from recycle_jax.runtime.errors import UserError, check


@dataclasses.dataclass(frozen=True)
class Bound:
  """A number's kind and range: lo <= x <= hi (strict where open); None where allowed."""
  kind: type = float  # int or float
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  none_ok: bool = False

  def describe(self) -> str:
    lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
    hi = "" if self.hi is None else f"<= {self.hi:g}"
    rng = " and ".join(s for s in (lo, hi) if s)
    kind = "an integer" if self.kind is int else "a finite number"
    return f"{kind}{' ' + rng if rng else ''}{' (or None)' if self.none_ok else ''}"

  def check(self, value: Any, where: str) -> None:
    if value is None and self.none_ok:
      return
    fix = f"pass {self.describe()}"
    ok_type = (isinstance(value, numbers.Integral) if self.kind is int
               else isinstance(value, numbers.Real)) and not isinstance(value, bool)
    check(ok_type, f"{value!r} is not {'an integer' if self.kind is int else 'a number'}",
          where, fix)
    check(math.isfinite(value), f"{value!r} is not finite", where, fix)
    check(self.lo is None or (value > self.lo if self.lo_open else value >= self.lo),
          f"{value!r} is out of range", where, fix)
    check(self.hi is None or value <= self.hi, f"{value!r} is out of range", where, fix)

  def bad_values(self) -> list:
    """Values this bound refuses (for the fault-injection suite)."""
    out = []
    if self.lo is not None:
      out.append(self.lo if self.lo_open else self.lo - 1)
    if self.hi is not None:
      out.append(self.hi * 10 + 1 if self.hi > 0 else self.hi + 1)
    if self.kind is float:
      out += [math.nan, math.inf]
    if not self.none_ok:
      out.append(None)
    return out


POSITIVE_INT = Bound(int, lo=1)
COUNT = Bound(int, lo=0)
# Flags (by their --name) and gin bindings (Configurable.parameter) with a range.
BOUNDS: dict[str, Bound] = {
    "--lam": Bound(float, lo=0, hi=100, lo_open=True),
    "--density": Bound(float, lo=0, hi=1, lo_open=True),
    "--seed": COUNT,
    "--max_examples": Bound(int, lo=1, none_ok=True),
    "--memory_budget_mb": Bound(float, lo=16, hi=2**20),  # 16 MiB .. 1 TiB of buffers
    "--num_seeds": Bound(int, lo=1, hi=1000),
    "--devices": Bound(int, lo=1, hi=1_000_000, none_ok=True),  # plan's mesh
    "--population": Bound(int, lo=1, hi=1_000_000, none_ok=True),
    "--batch_size": COUNT,
    "Experiment.max_examples": Bound(int, lo=1, none_ok=True),
    "Experiment.top_n": Bound(int, lo=1, none_ok=True),
    "SearchConfig.budget": POSITIVE_INT,
    "SearchConfig.population_size": Bound(int, lo=2, hi=1_000_000, none_ok=True),
    "SearchConfig.sigma_init": Bound(float, lo=0, hi=1e6, lo_open=True),
    "SearchConfig.seed": COUNT,
    "SweepConfig.num_weights": COUNT,
    "SweepConfig.budget": Bound(int, lo=1, none_ok=True),
    "SweepConfig.reference": Bound(float),
    "make_space.lam": Bound(float, lo=0, hi=100, lo_open=True),
    "make_space.density": Bound(float, lo=0, hi=1, lo_open=True),
    "make_space.seed": COUNT,
    "make_mesh.model": POSITIVE_INT,
    "choose_mode.memory_budget_gb": Bound(float, lo=0, lo_open=True),
    "make_scorer.batch_size": COUNT,
    "training_run_weights.lawa_k": Bound(int, lo=1, none_ok=True),
    "training_run_weights.ema_decay": Bound(float, lo=0, hi=1),
    "make_pool.seq_len": Bound(int, lo=2),
    "make_pool.batch_size": POSITIVE_INT,
    "make_pool.seed": COUNT,
    "make_pool.max_eval_examples": Bound(int, lo=1, none_ok=True),
    "ModelConfig.vocab_size": POSITIVE_INT,
    "ModelConfig.d_model": POSITIVE_INT,
    "ModelConfig.num_layers": POSITIVE_INT,
    "ModelConfig.num_heads": POSITIVE_INT,
    "ModelConfig.num_kv_heads": POSITIVE_INT,
    "ModelConfig.d_ff": POSITIVE_INT,
    "ModelConfig.rope_theta": Bound(float, lo=0, hi=1e12, lo_open=True),
    "ModelConfig.norm_eps": Bound(float, lo=0, hi=1, lo_open=True),
    "TrainConfig.steps": COUNT,
    "TrainConfig.batch_size": POSITIVE_INT,
    "TrainConfig.learning_rate": Bound(float, lo=0),
    "TrainConfig.warmup_steps": COUNT,
    "TrainConfig.weight_decay": Bound(float, lo=0),
    "TrainConfig.dpo_beta": Bound(float, lo=0, lo_open=True),
    "TrainConfig.dpo_sft_weight": Bound(float, lo=0),
}


# ----------------------------------------------------------------------------- flags

def check_flags(args) -> None:
  """Every parsed flag with a registered bound, and every number finite (argparse gave
  each its type already; a new float flag is checked without an entry here)."""
  for dest, value in sorted(vars(args).items()):
    if isinstance(value, float):
      check(math.isfinite(value), f"{value!r} is not finite", f"--{dest}", "pass a number")
  for name, bound in BOUNDS.items():
    dest = name[2:]
    if name.startswith("--") and getattr(args, dest, None) is not None:  # None: not given
      bound.check(getattr(args, dest), name)


# ----------------------------------------------------------------------------- gin

def hints(fn) -> dict[str, Any]:
  """{parameter: annotation} of a gin configurable (a function or a dataclass)."""
  target = fn.__init__ if inspect.isclass(fn) else fn
  target = inspect.unwrap(target)
  try:
    return typing.get_type_hints(target)
  except Exception:  # noqa: BLE001 (an annotation naming what is not importable here)
    return {}


def matches(value: Any, hint: Any) -> bool:
  """Whether a gin value can be of annotation `hint` (gin references are taken on trust)."""
  import gin
  if isinstance(value, gin.config.ConfigurableReference):  # also macros
    return True
  if hint is Any or hint is inspect.Parameter.empty:
    return True
  origin, params = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return any(matches(value, h) for h in params)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if origin is not None and origin.__module__ in ("collections.abc", "typing") and \
      origin.__name__ in ("Sequence", "list", "tuple"):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      return False
    inner = params[0] if params and params[-1] is not Ellipsis or len(params) == 2 else Any
    return all(matches(v, inner) for v in value)
  if origin is dict or hint is dict:
    return isinstance(value, dict)
  if inspect.isclass(hint):
    return isinstance(value, hint)
  return True


def describe_hint(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_binding(name: str, value: Any, hint: Any) -> None:
  """One gin binding `Configurable.parameter = value`: of its type, in its range."""
  unscoped = name.split("/")[-1]
  check(matches(value, hint), f"{value!r} is not of type {describe_hint(hint)}", name,
        f"bind {unscoped} to a value of type {describe_hint(hint)}")
  if unscoped in BOUNDS and not (value is None and matches(None, hint)):
    BOUNDS[unscoped].check(value, name)


# ----------------------------------------------------------------------------- weights

def check_weights(weights: Sequence[float], count: int, flag: str, signed: bool = False,
                  what: str = "") -> list[float]:
  """Exactly `count` finite weights; >= 0 and not all zero unless the method is `signed`.
  what: what the count is of ('a pool of N checkpoints' by default)."""
  what = what or f"a pool of {count} checkpoints"
  check(len(weights) == count, f"got {len(weights)} weights for {what}", flag,
        f"pass exactly {count} comma-separated weights")
  bad = [w for w in weights if not math.isfinite(w)]
  check(not bad, f"weight {bad[0]!r} is not finite" if bad else "", flag,
        "pass finite numbers")
  if not signed:
    neg = [w for w in weights if w < 0]
    check(not neg, f"negative weight {neg[0]:g}" if neg else "", flag,
          "this method needs weights >= 0")
    check(sum(weights) > 0, "all weights are zero", flag, "give at least one positive weight")
  return list(weights)


def parse_numbers(text: str, flag: str) -> list[float]:
  """'0.5,0.5' -> [0.5, 0.5]; one line naming the flag otherwise."""
  try:
    return [float(w) for w in text.split(",")]
  except ValueError:
    raise UserError(f"weights must be numbers, got {text!r}", flag,
                    "pass comma-separated numbers like 0.5,0.5") from None


# ----------------------------------------------------------------------------- documents
# Bounds of every JSON and YAML document read (configs, manifests, headers, JSONL lines):
# deeper nesting, a bigger expansion (YAML aliases) or a number beyond float range is
# refused by name instead of ending in RecursionError, OverflowError or out of memory.
MAX_DEPTH = 64  # levels of nesting (Hugging Face configs use 4, tokenizer.json 6)
MAX_YAML_NODES = 100_000  # nodes of a YAML document with every alias expanded
MAX_YAML_BYTES = 16 << 20
FLOAT_MAX = 1.7976931348623157e308


class DocumentError(ValueError):
  """A document beyond the bounds (raised inside the parse; readers add the file name)."""


def _short_number(text: str) -> str:
  return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


def _parse_float(text: str) -> float:
  x = float(text)
  if not math.isfinite(x):
    raise DocumentError(f"number {_short_number(text)} is out of float range")
  return x


def _parse_int(text: str) -> int:
  if len(text.lstrip("-")) > 309 or (len(text) > 300 and abs(int(text)) > FLOAT_MAX):
    raise DocumentError(f"number {_short_number(text)} is out of float range")
  return int(text)


def check_document(doc: Any) -> Any:
  """`doc` within the bounds: nesting depth, numbers in float range, strings that are
  Unicode text (no lone surrogates, which JSON's \\uD800 escapes can spell)."""
  stack = [(doc, 1)]
  while stack:
    x, depth = stack.pop()
    if isinstance(x, (dict, list)):
      if depth > MAX_DEPTH:
        raise DocumentError(f"it is nested deeper than {MAX_DEPTH} levels")
      items = x.items() if isinstance(x, dict) else ((None, v) for v in x)
      for k, v in items:
        if isinstance(k, str):
          _check_text(k)
        stack.append((v, depth + 1))
    elif isinstance(x, str):
      _check_text(x)
    elif isinstance(x, int) and not isinstance(x, bool) and abs(x) > FLOAT_MAX:
      raise DocumentError(f"number {_short_number(str(x))} is out of float range")
  return doc


def _check_text(s: str) -> None:
  try:
    s.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DocumentError(f"a string holds a lone surrogate (U+{ord(s[e.start]):04X}), which "
                        "is not Unicode text") from None


def parse_json(text: str | bytes) -> Any:
  """json.loads, strictly (no NaN/Infinity tokens) and within the bounds; ValueError
  (JSONDecodeError or DocumentError) otherwise."""
  try:
    doc = json.loads(text, parse_constant=_no_constant, parse_float=_parse_float,
                     parse_int=_parse_int)
  except RecursionError:
    raise DocumentError(f"it is nested deeper than {MAX_DEPTH} levels") from None
  return check_document(doc)


def parse_yaml(text: str) -> Any:
  """yaml.safe_load within the bounds: the node graph is composed first and its size with
  every alias expanded counted (an alias bomb stops at MAX_YAML_NODES, before anything is
  built); yaml.YAMLError or DocumentError otherwise."""
  import yaml
  if len(text) > MAX_YAML_BYTES:
    raise DocumentError(f"it is {len(text)} characters long, more than {MAX_YAML_BYTES}")
  loader = yaml.SafeLoader(text)
  try:
    try:
      node = loader.get_single_node()
    except RecursionError:
      raise DocumentError(f"it is nested deeper than {MAX_DEPTH} levels") from None
    if node is None:
      return None
    count, stack = 0, [(node, 1)]
    while stack:
      n, depth = stack.pop()
      count += 1
      if count > MAX_YAML_NODES:
        raise DocumentError(f"it expands to more than {MAX_YAML_NODES} nodes (aliases "
                            "repeating aliases?)")
      if depth > MAX_DEPTH:
        raise DocumentError(f"it is nested deeper than {MAX_DEPTH} levels")
      if isinstance(n, yaml.SequenceNode):
        stack.extend((c, depth + 1) for c in n.value)
      elif isinstance(n, yaml.MappingNode):
        stack.extend((c, depth + 1) for kv in n.value for c in kv)
    return check_document(loader.construct_document(node))
  finally:
    loader.dispose()


def split_lines(data: str) -> list[str]:
  """JSON Lines' lines: split at \\n only (U+2028, U+0085 and other line separators that
  str.splitlines honours may sit inside a JSON string)."""
  lines = data.split("\n")
  return [l[:-1] if l.endswith("\r") else l for l in lines]


# ----------------------------------------------------------------------------- files

def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON (write null or a number)")


def load_json(path: str, what: str, fix: str = "rewrite it as UTF-8 JSON") -> Any:
  """A JSON file, strictly: UTF-8, no NaN/Infinity tokens; one line naming it otherwise.
  The read is bounded (waits): a manifest or config on a hung filesystem ends in one line."""
  def read() -> bytes:
    with open(path, "rb") as f:
      return f.read()
  try:
    data = waits.call(read, f"reading the {what}", path)
  except OSError as e:
    raise UserError(f"cannot read the {what}: {e.strerror}", path, "check the path") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"the {what} is not UTF-8 text (byte {e.start})", path, fix) from None
  check(text.strip() != "", f"the {what} is empty", path, fix)
  try:
    return parse_json(text)
  except DocumentError as e:
    raise UserError(f"the {what} is beyond what is read: {e}", path, fix) from None
  except ValueError as e:  # JSONDecodeError, and NaN tokens
    msg = f"{e.msg} at line {e.lineno} column {e.colno}" if hasattr(e, "msg") else str(e)
    raise UserError(f"the {what} is not valid JSON: {msg}", path, fix) from None


def require_fields(doc: Any, schema: dict[str, Any], what: str, where: str,
                   optional: Sequence[str] = ()) -> None:
  """Each field of `schema` present (unless optional) with its type, in its Bound."""
  check(isinstance(doc, dict), f"the {what} is a {type(doc).__name__}, not an object",
        where, f"write the {what} as a JSON object")
  for key, spec in schema.items():
    if key not in doc:
      check(key in optional, f"the {what} lacks {key!r}", where, f"add {key!r}")
      continue
    value = doc[key]
    if isinstance(spec, Bound):
      spec.check(value, f"{key} in {where}")
    else:
      check(matches(value, spec), f"{key} is {value!r}, not of type {describe_hint(spec)}",
            where, f"write {key} as {describe_hint(spec)}")


# Hugging Face config.json fields read by `convert` (and written back on export).
HF_CONFIG: dict[str, Any] = {
    "model_type": str,
    "vocab_size": Bound(int, lo=1, hi=2**24),
    "hidden_size": Bound(int, lo=1, hi=2**18),
    "intermediate_size": Bound(int, lo=1, hi=2**20),
    "num_hidden_layers": Bound(int, lo=1, hi=2**12),
    "num_attention_heads": Bound(int, lo=1, hi=2**12),
    "num_key_value_heads": Bound(int, lo=1, hi=2**12, none_ok=True),
    "head_dim": Bound(int, lo=1, hi=2**14, none_ok=True),
    "rms_norm_eps": Bound(float, lo=0, hi=1, lo_open=True),
    "rope_theta": Bound(float, lo=0, hi=1e12, lo_open=True),
    "max_position_embeddings": Bound(int, lo=1, hi=2**31),
    "tie_word_embeddings": bool,
    "hidden_act": str,
    "dtype": str | None,
    "torch_dtype": str | None,
    "attention_bias": bool,
    "mlp_bias": bool,
    "bos_token_id": int | list | None,
    "eos_token_id": int | list | None,
    "pad_token_id": int | None,
}


def check_hf_config(doc: Any, where: str) -> None:
  """The types and ranges of the fields present (which are required: the model family's
  own check, `families.from_hf_config`)."""
  require_fields(doc, HF_CONFIG, "config.json", where, optional=list(HF_CONFIG))


MAX_SAFETENSORS_HEADER = 100 * 2**20  # as the safetensors library's own limit
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2,
                      "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8}
# A model's weights and biases are of a floating type; one declared an integer type (a
# float32 embedding relabelled I32 has the same byte size) would be read as integers.
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
WEIGHT_SUFFIXES = (".weight", ".bias")


def check_safetensors(path: str) -> dict:
  """The header of a safetensors file, checked against the file: one line naming the file
  when it is not what its name says (pickled data, zip, truncated, garbage), when two
  tensors' byte ranges overlap, or when a weight is declared of a non-floating type. No
  tensor read."""
  return read_safetensors_header(path)[0]


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """(the checked header, the offset its data starts at): see check_safetensors."""
  fix = "re-export it with safetensors (transformers: save_pretrained(safe_serialization=True))"
  bad = "cannot read safetensors header: "
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else -1
      check(0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8),
            f"{bad}not a safetensors file ({_sniff(head)})", path, fix)
      raw = f.read(n)
  except OSError as e:
    raise UserError(f"cannot read the weights file: {e.strerror}", path, "check it") from None
  try:
    header = parse_json(raw.decode("utf-8"))
  except DocumentError as e:
    raise UserError(f"{bad}{e}", path, fix) from None
  except (UnicodeDecodeError, ValueError):
    raise UserError(f"{bad}not a safetensors file (not JSON)", path, fix) from None
  check(isinstance(header, dict), f"{bad}not a safetensors file (not an object)", path, fix)
  ranges = []
  for name, t in header.items():
    if name == "__metadata__":
      continue
    ok = (isinstance(t, dict) and t.get("dtype") in SAFETENSORS_DTYPES and
          isinstance(t.get("shape"), list) and all(
              isinstance(d, int) and d >= 0 for d in t["shape"]) and
          isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2 and
          all(isinstance(o, int) for o in t["data_offsets"]))
    check(ok, f"{bad}tensor {name!r} has a malformed entry", path, fix)
    lo, hi = t["data_offsets"]
    nbytes = math.prod(t["shape"]) * SAFETENSORS_DTYPES[t["dtype"]]
    check(0 <= lo <= hi and hi - lo == nbytes,
          f"{bad}tensor {name!r}: offsets {lo}..{hi} do not hold its {nbytes} bytes", path, fix)
    check(not name.endswith(WEIGHT_SUFFIXES) or t["dtype"] in WEIGHT_DTYPES,
          f"tensor {name!r} is declared {t['dtype']}, not a floating type (weights are "
          f"{', '.join(WEIGHT_DTYPES)}): quantized weights or a damaged header", path,
          "give the model's weights in a floating type (dequantize it, or re-export it)")
    if hi > lo:
      ranges.append((lo, hi, name))
  ranges.sort()
  for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
    check(start >= end, f"{bad}tensors {a!r} and {b!r} share bytes (their offsets overlap)",
          path, fix)
  end = max((hi for _, hi, _ in ranges), default=0)
  check(8 + n + end <= size, f"{bad}the file is truncated: {size} bytes, the header needs "
        f"{8 + n + end}", path, "copy or download it again")
  return header, 8 + n


def _sniff(head: bytes) -> str:
  if head[:1] == b"\x80":
    return "it holds pickled Python objects, which are never loaded"
  if head[:2] == b"PK":
    return "it is a zip archive (a torch .bin?), which is never loaded"
  if head[:1] in (b"{", b"["):
    return "it is JSON"
  return "its header length is impossible" if len(head) == 8 else "it is too short"


def build(cls, fields: Any, where: str, fix: str = ""):
  """cls(**fields) for a dataclass read from a file: an object of known fields, each of its
  annotated type and in its registered bound (as `Cls.field`); one line otherwise."""
  name = cls.__name__
  check(isinstance(fields, dict), f"{name} is a {type(fields).__name__}, not an object",
        where, fix)
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(fields) - set(hints))
  check(not unknown, f"{name} has unknown fields {unknown}", where, fix)
  for k, v in fields.items():
    check(matches(v, hints[k]), f"{name}.{k} is {v!r}, not of type {describe_hint(hints[k])}",
          where, fix)
    if f"{name}.{k}" in BOUNDS:
      BOUNDS[f"{name}.{k}"].check(v, f"{name}.{k} in {where}")
  return cls(**fields)
