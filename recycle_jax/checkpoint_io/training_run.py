"""A training run's own checkpoints as a pool: the steps an Orbax `CheckpointManager`
wrote into one run directory, and a step selection (`--steps`).

Layouts read (every one a `CheckpointManager` directory; steps found by Orbax's own step
naming, `ocp.path.step`, finalized steps only):
  RUN/<step>/items             MaxText (item name 'items'; its TrainState: params under
                               'params', itself {'params': {...}} for a flax model)
  RUN/<step>/default           Orbax's single-item default
  RUN/checkpoint_<step>/state  t5x's Orbax manager (its state dict: params under 'target')
A step's tree may be the parameters themselves or a train state; then its parameters are
its `params_subtree` (the optimizer state is never read: a partial restore); a pool
entry keeps that place in `info["subtree"]` (pool_manifest.Entry.subtree). Selections:
  last:K      the K newest steps
  every:N     the steps whose number is a multiple of N
  S1,S2,...   exactly these steps
  all         every step
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax

from recycle_jax.runtime import quiet, validation
from recycle_jax.runtime.errors import UserError, check

PyTree = Any
ITEMS = ("items", "default", "state")  # the parameters' item: MaxText, Orbax, t5x
PARAMS = ("params", "target")  # a train state's parameters: flax/MaxText, t5x
STEP_PREFIXES = (None, "checkpoint")  # RUN/<step> (MaxText, Orbax), RUN/checkpoint_<step> (t5x)
SYNTAX = "last:K, every:N, a comma-separated list of steps, or all"
FLAG = "--steps / Experiment.steps"


@dataclasses.dataclass(frozen=True)
class Selection:
  """A parsed step selection: kind 'last' | 'every' | 'list' | 'all' and its number(s)."""
  kind: str
  value: Any = None  # K, N, or a tuple of steps
  text: str = ""


def parse_steps(text: str, flag: str = FLAG) -> Selection:
  """'last:8' | 'every:100' | '200,400,600' | 'all' -> Selection; one line otherwise."""
  s = str(text).strip()
  bad = UserError(f"step selection {s[:60]!r} is not one of {SYNTAX}", flag,
                  "e.g. --steps=last:8")
  if s == "all":
    return Selection("all", None, s)
  kind, sep, num = s.partition(":")
  if sep:
    if kind not in ("last", "every") or not num.isdigit() or int(num) < 1:
      raise bad
    return Selection(kind, int(num), s)
  parts = [p.strip() for p in s.split(",")]
  if not parts or not all(p.isdigit() for p in parts):
    raise bad
  steps = tuple(int(p) for p in parts)
  check(len(set(steps)) == len(steps), f"step selection {s!r} names a step twice", flag,
        "list every step once")
  return Selection("list", steps, s)


def select(steps: Sequence[int], sel: Selection, where: str, flag: str = FLAG) -> list[int]:
  """The selected steps of `steps` (the run's, any order), ascending; at least 2."""
  have = sorted(steps)
  if sel.kind == "all":
    out = have
  elif sel.kind == "last":
    out = have[-sel.value:]
  elif sel.kind == "every":
    out = [s for s in have if s % sel.value == 0]
  else:
    missing = [s for s in sel.value if s not in set(have)]
    if missing:
      raise UserError(f"step {missing[0]} is not in the run (it has {describe(have)})",
                      where, "select steps the run has")
    out = sorted(sel.value)
  check(len(out) >= 2, f"--steps={sel.text} selects {len(out)} checkpoint"
        f"{'' if len(out) == 1 else 's'} ({describe(out) if out else 'none'}) of the run's "
        f"{describe(have)}; a pool needs 2 or more", f"{where}, {flag}",
        "select more steps (e.g. --steps=last:8)")
  return out


def describe(steps: Sequence[int]) -> str:
  """'steps 100, 200 and 300' / '12 steps 100..1200' for messages."""
  if len(steps) <= 4:
    return "step " + str(steps[0]) if len(steps) == 1 else \
        "steps " + ", ".join(map(str, steps))
  return f"{len(steps)} steps {steps[0]}..{steps[-1]}"


def find_steps(run_dir: str) -> dict[int, str]:
  """{step: step directory} of the run's finalized steps, by Orbax's step naming."""
  import orbax.checkpoint as ocp  # here: a manifest never needs it
  from etils import epath
  fmt = ocp.path.step.composite_name_format(
      ocp.path.step.standard_name_format(),
      [ocp.path.step.standard_name_format(step_prefix=p) for p in STEP_PREFIXES])
  try:
    found = fmt.find_all(epath.Path(os.path.abspath(run_dir)))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot list the run's steps: {type(e).__name__}: {e}", run_dir,
                    "point --pool at a CheckpointManager directory") from None
  return {int(m.step): str(m.path) for m in found
          if ocp.path.step.is_path_finalized(m.path)}


def item_dir(step_dir: str, step: int) -> str:
  """The step's parameters item: the one of `ITEMS` its metadata (or, for older Orbax, its
  directory) holds; a step written as one unnamed item is its own directory."""
  items = step_items(step_dir)
  for name in ITEMS:
    if name in items:
      return os.path.join(step_dir, name)
  check(os.path.exists(os.path.join(step_dir, "_METADATA")) and not items,
        f"step {step} holds no item named {' / '.join(ITEMS)} (it has "
        f"{sorted(items) or 'none'})", step_dir,
        "save the parameters (or the train state) as one of these items")
  return step_dir


def step_items(step_dir: str) -> list[str]:
  """The item names of a step: its _CHECKPOINT_METADATA's item_handlers when it names
  them, else its subdirectories holding an Orbax tree."""
  f = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  handlers = None
  if os.path.isfile(f):
    try:
      handlers = json.load(open(f)).get("item_handlers")
    except (OSError, ValueError, AttributeError):
      handlers = None
  if isinstance(handlers, dict):
    return sorted(handlers)
  return sorted(d for d in os.listdir(step_dir)
                if os.path.isfile(os.path.join(step_dir, d, "_METADATA")))


def params_subtree(tree: PyTree) -> tuple[str, ...]:
  """Where a step's tree keeps the parameters: () when it is the parameters; ('params',)
  or ('target',) for a train state; flax's {'params': {...}} collection unwrapped."""
  path: tuple[str, ...] = ()
  node = tree
  if isinstance(node, dict):
    key = next((k for k in PARAMS if k in node and isinstance(node[k], dict)), None)
    if key is not None and (len(node) > 1 or key == "target"):  # a state, not a layer
      path, node = (key,), node[key]
  while isinstance(node, dict) and list(node) == ["params"] and isinstance(node["params"], dict):
    path, node = path + ("params",), node["params"]
  return path


def subtree(tree: PyTree, path: Sequence[str], where: str) -> PyTree:
  """tree[path[0]][path[1]]...; one line naming the missing key otherwise."""
  for i, k in enumerate(path):
    check(isinstance(tree, dict) and k in tree, f"no {'/'.join(path[:i + 1])!r} in the tree "
          f"(its top level: {sorted(tree) if isinstance(tree, dict) else type(tree).__name__})",
          where, "every selected step must hold the same train state")
    tree = tree[k]
  return tree


def run_entries(run_dir: str, steps: str | Selection, flag: str = FLAG
                ) -> list[tuple[str, str, dict]]:
  """The selected steps of the run at `run_dir` as pool entries (name 'step_<n>', the
  step's parameters item, info {'step': n, 'subtree': [...]}), in step order; the first
  step's parameters checked against the model its metadata records."""
  sel = steps if isinstance(steps, Selection) else parse_steps(steps, flag)
  quiet.step_items()
  check(os.path.isdir(run_dir), "training run directory not found", run_dir,
        "pass --pool=RUN_DIR, the directory its CheckpointManager wrote")
  found = find_steps(run_dir)
  check(bool(found), "no checkpoint steps in the run directory (no finalized <step>/ or "
        "checkpoint_<step>/ directories)", run_dir,
        "point --pool at a CheckpointManager directory that has saved steps")
  chosen = select(list(found), sel, run_dir, flag)
  first = item_dir(found[chosen[0]], chosen[0])
  where = f"step {chosen[0]} of {run_dir}"
  tree = tree_metadata(first, where)
  path = params_subtree(tree)
  check_family(subtree(tree, path, where),
               step_custom(first).get("recycle_jax", {}).get("model"), where)
  return [(f"step_{s}", item_dir(found[s], s), {"step": s, "subtree": list(path)})
          for s in chosen]


def tree_metadata(item: str, where: str) -> PyTree:
  """The item's tree of ShapeDtypeStructs, from Orbax's metadata (no array read)."""
  import numpy as np
  import orbax.checkpoint as ocp
  try:
    tree = ocp.StandardCheckpointer().metadata(os.path.abspath(item)).item_metadata
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
                        dict(tree))
  except Exception as e:  # noqa: BLE001 (Orbax raises many types for unreadable metadata)
    raise UserError(f"step metadata is unreadable (corrupted or truncated?): "
                    f"{type(e).__name__}", where, "re-write or remove this step") from None


def step_custom(path: str) -> dict:
  """The custom metadata of the CheckpointManager step whose item `path` is (Orbax keeps
  it beside the items, in the step's _CHECKPOINT_METADATA); {} for any other checkpoint."""
  step_file = os.path.join(os.path.dirname(os.path.abspath(path)), "_CHECKPOINT_METADATA")
  if not os.path.isfile(step_file):
    return {}
  doc = validation.load_json(step_file, f"step metadata of {path}",
                             "re-write or remove this step")
  handlers = doc.get("item_handlers") if isinstance(doc, dict) else None
  custom = doc.get("custom_metadata") if isinstance(doc, dict) else None
  if not (isinstance(handlers, dict) and os.path.basename(os.path.normpath(path)) in handlers):
    return {}
  check(custom is None or isinstance(custom, dict), "step custom metadata is not a JSON "
        "object", step_file, "re-write or remove this step")
  return dict(custom or {})


def check_family(abstract: PyTree, model: dict | None, where: str) -> None:
  """A step's parameters against the model its metadata records: the same leaves and
  shapes as that family's parameters, or one line naming the first difference."""
  if not isinstance(model, dict):
    return
  from recycle_jax.models import transformer  # noqa: PLC0415 (flax: only for a family)
  from recycle_jax.models.partitioning import path_str
  cfg = validation.build(transformer.ModelConfig, model, where, "re-write this run")
  want = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  flat = lambda t: {path_str(p): tuple(x.shape) for p, x in  # noqa: E731
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  got, exp = flat(abstract), flat(want)
  for key in sorted(set(got) | set(exp)):
    check(key in got, f"parameter {key!r} of its {model.get('family', 'byte')} model is "
          "missing", where, "the step's parameters must be that model's")
    check(key in exp, f"parameter {key!r} is not one of its {model.get('family', 'byte')} "
          "model's", where, "the step's parameters must be that model's")
    check(got[key] == exp[key], f"parameter {key!r} has shape {got[key]}, its model's "
          f"{exp[key]}", where, "the step's parameters must be that model's")


# ----------------------------------------------------------------------------- writing

def open_run(run_dir: str):
  """A `CheckpointManager` writing MaxText's layout (RUN/<step>/items) into run_dir."""
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(run_dir), item_names=("items",),
                               options=ocp.CheckpointManagerOptions(create=True))


def save_step(manager, step: int, params: PyTree, custom: dict | None = None,
              opt_state: PyTree | None = None) -> None:
  """One step as MaxText saves it: the train state {'params', 'opt_state', 'step'} as the
  item 'items'; `custom` (e.g. {'recycle_jax': {'model': ...}}) in the step's metadata."""
  import numpy as np
  import orbax.checkpoint as ocp
  state = {"params": params, "step": np.int64(step)}
  if opt_state is not None:
    state["opt_state"] = opt_state
  manager.save(step, args=ocp.args.Composite(items=ocp.args.StandardSave(state)),
               custom_metadata=custom or {})
