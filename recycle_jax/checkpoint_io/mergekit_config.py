"""mergekit's YAML merge configs, read as they are into a plain plan.

`load(path)` validates a mergekit config (merge_method, base_model, models or slices with
per-model `parameters`, global `parameters`, dtype, out_dtype, tokenizer_source) against
mergekit 0.1.5's rules and returns a `Plan`; `Plan.resolve(tensor_name)` gives the
parameters mergekit would use for that tensor: per-model settings first, then the slice's,
then the global ones; `filter` conditions match substrings of the tensor name; a list of
numbers is a gradient interpolated over the layers of the slice (t = layer / (layers - 1),
t = 0 outside the layers), a list of booleans picks one.

Everything that recycle_jax would not merge as mergekit does is refused by name, before
anything is read or written: an unknown method, field or parameter, a parameter the method
does not take, a model or tokenizer source missing from disk (nothing is downloaded),
slices that stack or reorder layers, a tokenizer `union`.

No JAX here: the plan is plain Python, so the CLI checks a config before importing numerics.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

from recycle_jax.runtime import validation
from recycle_jax.runtime.registry import Registry
from recycle_jax.runtime.errors import UserError, check

SHARED, INPUT, NON_BASE = "shared", "input", "non_base"
REQUIRED = object()


ANY = (-math.inf, math.inf, False)


@dataclasses.dataclass(frozen=True)
class Param:
  name: str
  kind: type  # float, int or bool
  scope: str  # SHARED: one value per tensor; INPUT / NON_BASE: one per (non-base) model
  default: Any = REQUIRED
  valid: tuple[float, float, bool] = ANY  # (lo, hi, lo open): lo <= value <= hi

  def check_range(self, v: float, where: str) -> None:
    lo, hi, lo_open = self.valid
    check((v > lo if lo_open else v >= lo) and v <= hi, f"parameter {self.name!r} is "
          f"{v!r}, outside {'(' if lo_open else '['}{lo:g}, {hi:g}]", where,
          f"give {self.name} in that range (mergekit would merge it into a wrong or "
          "non-finite model)")


@dataclasses.dataclass(frozen=True)
class Method:
  """A mergekit merge method's interface (mergekit/merge_methods/*.py, 0.1.5)."""
  name: str
  params: tuple[Param, ...]
  base: str = "ignored"  # required | optional | ignored (the base is one more input)
  min_inputs: int = 1
  max_inputs: int | None = None
  min_non_base: int | None = None
  max_non_base: int | None = None

  def param(self, name: str) -> Param | None:
    return {p.name: p for p in self.params}.get(name)


def _gta(name: str, normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> Method:
  return Method(name, (Param("int8_mask", bool, SHARED, False),
                       Param("normalize", bool, SHARED, normalize),
                       Param("rescale", bool, SHARED, rescale),
                       Param("lambda", float, SHARED, 1.0),
                       Param("weight", float, NON_BASE),
                       Param("density", float, NON_BASE, 1.0, DENSITY)) + extra,
                base="required")


# The ranges of the `--pool` flags (merging.methods' Hparam.valid), so a config merges only
# what the same method would merge from flags: a fraction kept, a fraction pruned.
DENSITY = (0.0, 1.0, True)
GAMMA = (Param("gamma", float, NON_BASE, 0.01, (0.0, 0.5, False)),)
EPSILON = (Param("epsilon", float, NON_BASE, 0.15, (0.0, 0.5, False)),)
REGISTRY: Registry[Method] = Registry("merge method")
for _m in (
    Method("linear", (Param("weight", float, INPUT), Param("normalize", bool, SHARED, True))),
    _gta("task_arithmetic", False, False),
    _gta("ties", True, False),
    _gta("dare_ties", False, True),
    _gta("dare_linear", False, True),
    _gta("breadcrumbs", False, False, GAMMA),
    _gta("breadcrumbs_ties", False, False, GAMMA),
    _gta("della", True, True, EPSILON),
    _gta("della_linear", False, True, EPSILON),
    Method("slerp", (Param("t", float, SHARED, valid=(0.0, 1.0, False)),), base="required",
           min_inputs=2,
           max_inputs=2),
    Method("nuslerp", (Param("weight", float, NON_BASE),
                       Param("nuslerp_row_wise", bool, SHARED, False),
                       Param("nuslerp_flatten", bool, SHARED, True)), base="optional",
           min_non_base=2, max_non_base=2),
    Method("multislerp", (Param("weight", float, NON_BASE),
                          Param("normalize_weights", bool, SHARED, True),
                          Param("eps", float, SHARED, 1e-8, (0.0, 1.0, True))),
           base="optional",
           min_non_base=1),
    Method("karcher", (Param("max_iter", int, SHARED, 10, (1, 10_000, False)),
                       Param("tol", float, SHARED, 1e-5, (0.0, 1.0, True)))),
    Method("model_stock", (Param("filter_wise", bool, SHARED, False),), base="required",
           min_inputs=3),
    Method("passthrough", (Param("scale", float, INPUT, None),), max_inputs=1),
    Method("sce", (Param("int8_mask", bool, SHARED, False),
                   Param("select_topk", float, SHARED, 1.0)), base="required"),
    Method("nearswap", (Param("t", float, SHARED),), base="required", min_inputs=2,
           max_inputs=2),
    Method("arcee_fusion", (), base="required", min_inputs=2, max_inputs=2),
):
  REGISTRY.register(_m)
NOT_SUPPORTED = ("ram", "ramplus_tl")
TOP_FIELDS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
              "out_dtype", "tokenizer_source")
REFUSED_FIELDS = {"modules": "multi-module configs", "tokenizer": "the tokenizer section "
                  "(added tokens, vocabulary padding)", "chat_template": "chat_template"}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
          "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Source:
  model: str  # absolute path of a Hugging Face folder
  parameters: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Slice:
  start: int  # layers [start, end) of every source, output at the same positions
  end: int
  sources: tuple[Source, ...]
  parameters: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated mergekit config. inputs: every model merged, in mergekit's order (the
  config's, then the base when not listed); non_base: those that are not the base."""
  path: str
  method: Method
  base: str | None
  slices: tuple[Slice, ...]
  parameters: Mapping[str, Any] | None
  dtype: str | None  # mergekit loads tensors in it; recycle_jax accumulates in float32
  out_dtype: str | None  # the output's dtype (else dtype, else the stored one)
  tokenizer_source: str | None  # folder whose tokenizer files the output gets
  num_layers: int

  @property
  def inputs(self) -> tuple[str, ...]:
    return tuple(s.model for s in self.slices[0].sources)

  @property
  def non_base(self) -> tuple[str, ...]:
    return tuple(m for m in self.inputs if m != self.base)

  def layer_of(self, tensor_name: str) -> tuple[Slice, float]:
    """The slice a tensor belongs to and its gradient position t."""
    m = _LAYER.search(tensor_name)
    if m is None:  # embeddings come before the layers, the rest after
      return (self.slices[0] if "embed" in tensor_name else self.slices[-1]), 0.0
    i = int(m[1])
    for s in self.slices:
      if s.start <= i < s.end:
        n = s.end - s.start
        return s, (i - s.start) / (n - 1) if n > 1 else 1.0
    raise UserError(f"tensor {tensor_name} is in layer {i}, outside the config's slices",
                    self.path, "the slices must cover every layer of the models")

  def resolve(self, tensor_name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(shared parameters, per-input parameters) for a tensor, as mergekit resolves them.
    The base gets INPUT-scoped parameters only."""
    s, t = self.layer_of(tensor_name)
    scopes = lambda model: ([src.parameters for src in s.sources if src.model == model]
                            if model else []) + [s.parameters, self.parameters]
    shared = {p.name: _resolve(p, scopes(None), tensor_name, t, self.path)
              for p in self.method.params if p.scope == SHARED}
    per = {m: {p.name: _resolve(p, scopes(m), tensor_name, t, self.path, m)
               for p in self.method.params
               if p.scope == INPUT or (p.scope == NON_BASE and m != self.base)}
           for m in self.inputs}
    return shared, per


# ----------------------------------------------------------------------------- settings

def _scalar(p: Param, v: Any, where: str) -> Any:
  """A setting's value as the parameter's type (mergekit/pydantic accept numeric strings,
  e.g. YAML's `1e-3`, for numbers)."""
  if p.kind is bool:
    check(isinstance(v, bool), f"parameter {p.name!r} must be true or false, got {v!r}",
          where)
    return v
  if isinstance(v, str):
    try:
      v = float(v)
    except ValueError:
      raise UserError(f"parameter {p.name!r} must be a number, got {v!r}", where) from None
  check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        f"parameter {p.name!r} must be a finite number, got {v!r}", where)
  p.check_range(v, where)
  if p.kind is int:
    check(float(v).is_integer(), f"parameter {p.name!r} must be an integer, got {v!r}", where)
    return int(v)
  return float(v)


def _check_setting(p: Param, setting: Any, where: str) -> None:
  """Type-check a setting once, at load time: a scalar, a gradient list, or conditions."""
  conds = [setting] if isinstance(setting, dict) else setting
  if isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds):
    for c in conds:
      extra = sorted(set(c) - {"value", "filter"})
      check(not extra and "value" in c, f"a conditional setting of {p.name!r} has keys "
            f"{sorted(c)}", where, "write {value: ..., filter: ...}")
      check(c.get("filter") is None or isinstance(c["filter"], str),
            f"filter of {p.name!r} must be a string", where)
      _check_setting(p, c["value"], where)
    return
  values = setting if isinstance(setting, list) else [setting]
  check(len(values) > 0, f"parameter {p.name!r} is an empty list", where)
  for v in values:
    check(not isinstance(v, (list, dict)), f"parameter {p.name!r} has a nested value {v!r}",
          where, "give a number, a list of numbers, or [{filter: ..., value: ...}]")
    _scalar(p, v, where)


def _evaluate(p: Param, setting: Any, tensor_name: str, t: float, where: str) -> Any:
  """mergekit config.evaluate_setting: None when no condition matches."""
  if isinstance(setting, dict):
    setting = [setting]
  if not isinstance(setting, list):
    return _scalar(p, setting, where)
  if all(isinstance(c, dict) for c in setting):
    for c in setting:
      f = c.get("filter")
      if f is None or f == "*" or (tensor_name and f in tensor_name):
        return _evaluate(p, c["value"], tensor_name, t, where)
    return None
  values = [_scalar(p, v, where) for v in setting]
  if p.kind is bool:
    return values[int(t * (len(values) - 1))]
  scaled = t * (len(values) - 1)
  i0 = int(scaled)
  i1 = min(len(values) - 1, i0 + 1)
  frac = scaled - i0
  out = (1 - frac) * values[i0] + frac * values[i1]
  return _scalar(p, out, where)


def _resolve(p: Param, scopes, tensor_name: str, t: float, where: str, model=None) -> Any:
  for scope in scopes:
    if scope is not None and p.name in scope:
      v = _evaluate(p, scope[p.name], tensor_name, t, where)
      if v is not None:
        return v
  check(p.default is not REQUIRED, f"parameter {p.name!r} is required for "
        f"{os.path.basename(model) + ':' if model else ''}{tensor_name}", where,
        f"set it in the global parameters or per model")
  return p.default


# ----------------------------------------------------------------------------- loading

def _model_dir(ref: Any, where: str) -> str:
  check(isinstance(ref, str) and ref.strip() != "", f"a model reference must be a path, got "
        f"{ref!r}", where)
  check("+" not in os.path.basename(ref), f"model {ref!r} applies a LoRA adapter ('+')",
        where, "merge the adapter into the model first")
  path = os.path.abspath(os.path.expanduser(ref))
  check(os.path.isdir(path), f"model {ref!r} not found on disk", where,
        "give the path of a local Hugging Face folder (nothing is downloaded)")
  check(os.path.isfile(os.path.join(path, "config.json")), f"model {ref!r} has no "
        "config.json", where, "give a folder written by transformers' save_pretrained")
  return path


def num_layers(model: str) -> int:
  path = os.path.join(model, "config.json")
  cfg = validation.load_json(path, "model config", "re-save the model's config.json")
  check(isinstance(cfg, dict) and isinstance(cfg.get("text_config", {}), dict),
        "config.json is not an object", path, "re-save the model's config.json")
  n = cfg.get("num_hidden_layers", cfg.get("text_config", {}).get("num_hidden_layers"))
  check(isinstance(n, int) and n > 0, "config.json has no num_hidden_layers", model)
  return n


def _params(settings: Any, method: Method, where: str, per_model: bool) -> dict | None:
  if settings is None:
    return None
  check(isinstance(settings, dict), "parameters must be a mapping of name: value", where)
  for name, setting in settings.items():
    p = method.param(name)
    check(p is not None, f"merge method {method.name!r} takes no parameter {name!r}", where,
          f"its parameters: {', '.join(q.name for q in method.params) or 'none'}")
    check(not per_model or p.scope != SHARED, f"parameter {name!r} applies to the whole "
          "merge, not to one model", where, "move it to the global parameters")
    _check_setting(p, setting, f"{where}.{name}")
  return settings


def _sources(raw: Any, method: Method, where: str) -> tuple[Source, ...]:
  check(isinstance(raw, list) and raw, "no models listed", where, "list at least one model")
  out = []
  for i, m in enumerate(raw):
    w = f"{where}[{i}]"
    if isinstance(m, str):
      m = {"model": m}
    check(isinstance(m, dict) and "model" in m, "each entry needs a `model`", w)
    extra = sorted(set(m) - {"model", "parameters", "layer_range"})
    check(not extra, f"unsupported field {', '.join(map(repr, extra))}", w, "recycle_jax reads model, "
          "parameters (and layer_range in slices)")
    out.append(Source(_model_dir(m["model"], f"{w}.model"),
                      _params(m.get("parameters"), method, f"{w}.parameters", True)))
  paths = [s.model for s in out]
  check(len(set(paths)) == len(paths), "a model is listed twice", where,
        "list each model once")
  return tuple(out)


def _slices(raw: Any, method: Method, where: str) -> tuple[Slice, ...]:
  """mergekit `slices` that keep every layer in place (a layer range per slice, in order,
  covering all layers): what they express is per-range parameters and gradients."""
  check(isinstance(raw, list) and raw, "slices must be a non-empty list", where)
  out, pos = [], 0
  for k, sl in enumerate(raw):
    w = f"{where}[{k}]"
    check(isinstance(sl, dict), "a slice must be a mapping", w)
    extra = sorted(set(sl) - {"sources", "parameters", "base_model"})
    check(not extra, f"unsupported field {', '.join(map(repr, extra))}", w)
    srcs = _sources(sl.get("sources"), method, f"{w}.sources")
    ranges = {tuple(r["layer_range"]) if isinstance(r, dict) and isinstance(
        r.get("layer_range"), list) else None for r in sl["sources"]}
    check(len(ranges) == 1 and None not in ranges, "every source of a slice needs the same "
          "layer_range [start, end]", w)
    start, end = ranges.pop()
    check(start == pos and end > start, f"slice layers [{start}, {end}) do not continue "
          f"from layer {pos}", w, "recycle_jax merges layers in place; slices that stack, "
          "skip or reorder layers (passthrough frankenmerges) are not supported")
    check(sl.get("base_model") is None, "a per-slice base_model is not supported", w,
          "use the global base_model")
    out.append(Slice(start, end, srcs, _params(sl.get("parameters"), method,
                                               f"{w}.parameters", False)))
    pos = end
  layers = num_layers(out[0].sources[0].model)
  check(pos == layers, f"the slices cover layers [0, {pos}), the models have {layers}", where,
        "cover every layer")
  return tuple(out)


def _tokenizer_source(value: Any, base: str | None, first: str, where: str) -> str | None:
  if value is None:
    return None
  check(value != "union", "tokenizer_source: union (a merged vocabulary) is not supported",
        where, "use base or a model's path")
  folder = (base or first) if value == "base" else _model_dir(value, where)
  check(any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES),
        f"tokenizer source {folder} has no tokenizer files", where,
        f"give a folder holding one of {', '.join(TOKENIZER_FILES[:3])}")
  return folder


def _dtype(value: Any, where: str) -> str | None:
  if value is None:
    return None
  name = str(value).removeprefix("torch.")
  check(name in DTYPES, f"dtype {value!r} is not supported", where,
        f"choose from {sorted(set(DTYPES.values()))}")
  return DTYPES[name]


def parse(raw: Any, path: str) -> Plan:
  """A mergekit config (already parsed YAML) -> a validated Plan."""
  check(isinstance(raw, dict), "a mergekit config must be a mapping", path)
  for name in raw:
    check(name not in REFUSED_FIELDS, f"{REFUSED_FIELDS.get(name)} ({name!r}) are not "
          "supported", path, "remove the field")
    check(name in TOP_FIELDS, f"unsupported field {name!r}", path,
          f"recycle_jax reads {', '.join(TOP_FIELDS)}")
  name = raw.get("merge_method")
  check(isinstance(name, str), f"merge_method is {name!r}, not a method name",
        f"{path}: merge_method", f"choose from {sorted(REGISTRY)}")
  check(name not in NOT_SUPPORTED, f"merge method {name!r} is not supported by recycle_jax",
        f"{path}: merge_method", f"choose from {sorted(REGISTRY)}")
  method = REGISTRY.get(name, f"{path}: merge_method")
  check(("models" in raw) != ("slices" in raw), "give exactly one of models and slices", path)
  base = None if raw.get("base_model") is None else _model_dir(raw["base_model"],
                                                               f"{path}: base_model")
  check(base is not None or method.base != "required", f"merge method {name!r} needs a "
        "base_model", path, "add base_model: PATH")
  if "models" in raw:
    srcs = _sources(raw["models"], method, f"{path}: models")
    slices = (Slice(0, num_layers(srcs[0].model), srcs),)
  else:
    slices = _slices(raw["slices"], method, f"{path}: slices")
  layers = slices[-1].end
  if base is not None:  # mergekit adds an unlisted base as one more input of every slice
    slices = tuple(s if base in [x.model for x in s.sources] else dataclasses.replace(
        s, sources=s.sources + (Source(base),)) for s in slices)
  for s in slices:
    for src in s.sources:
      n = num_layers(src.model)
      check(n == layers, f"model {src.model} has {n} layers, {slices[0].sources[0].model} "
            f"{layers}", path, "merge models of one architecture")
  plan = Plan(path, method, base, slices, _params(raw.get("parameters"), method,
                                                  f"{path}: parameters", False),
              _dtype(raw.get("dtype"), f"{path}: dtype"),
              _dtype(raw.get("out_dtype"), f"{path}: out_dtype"),
              _tokenizer_source(raw.get("tokenizer_source"), base,
                                slices[0].sources[0].model, f"{path}: tokenizer_source"),
              layers)
  _check_counts(plan)
  return plan


def _check_counts(plan: Plan) -> None:
  m, n, nb = plan.method, len(plan.inputs), len(plan.non_base)
  where = f"{plan.path}: models"
  check(n >= m.min_inputs, f"merge method {m.name!r} needs at least {m.min_inputs} models "
        f"(the base included), the config gives {n}", where)
  check(m.max_inputs is None or n <= m.max_inputs, f"merge method {m.name!r} takes at most "
        f"{m.max_inputs} models (the base included), the config gives {n}", where)
  check(m.min_non_base is None or nb >= m.min_non_base, f"merge method {m.name!r} needs at "
        f"least {m.min_non_base} models besides the base, the config gives {nb}", where)
  check(m.max_non_base is None or nb <= m.max_non_base, f"merge method {m.name!r} takes at "
        f"most {m.max_non_base} models besides the base, the config gives {nb}", where)


def load(path: str) -> Plan:
  """Read and validate a mergekit YAML config (one clear line for anything refused)."""
  import yaml
  check(os.path.isfile(path), "mergekit config not found", path, "pass --config=merge.yml")
  try:
    check(os.path.getsize(path) <= validation.MAX_YAML_BYTES, "the mergekit config is "
          f"larger than {validation.MAX_YAML_BYTES >> 20} MiB", path, "give a mergekit config")
    with open(path, encoding="utf-8") as f:
      raw = validation.parse_yaml(f.read())
  except validation.DocumentError as e:
    raise UserError(f"the mergekit config is beyond what is read: {e}", path,
                    "write a plain mergekit config") from None
  except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
    msg = " ".join(str(e).split())[:200]
    raise UserError(f"cannot read the mergekit config: {msg}", path,
                    "fix the YAML") from None
  return parse(raw, path)


# ----------------------------------------------------------------------------- search

def is_config(spec: Any) -> bool:
  return isinstance(spec, str) and spec.endswith((".yml", ".yaml"))


def pool_and_base(path: str) -> tuple[list[tuple[str, str]], str | None]:
  """A search's pool from a mergekit config: its models besides the base, named by their
  folders, and its base_model (`Experiment.pool = 'merge.yml'`)."""
  plan = load(path)
  names = [os.path.basename(os.path.normpath(m)) for m in plan.non_base]
  check(len(set(names)) == len(names), f"two models share a folder name {names}", path,
        "rename one folder: pool members are named by their folders")
  return list(zip(names, plan.non_base)), plan.base
