"""`recycle-jax plan`: will this pool's population program fit this mesh, and how fast can
it run, decided before a pod is allocated.

From metadata alone (Orbax metadata, or a Hugging Face folder's config.json and
safetensors headers; no tensor is read) the pool becomes abstract arrays with the
shardings a run would give them (`partitioning`), the tasks become synthetic splits of
the given shapes placed as a run places them (rows over 'data'), and the population
program (`population.make_population_fn`: merge P candidates and score them) is lowered
and compiled ahead of time on a mesh of as many devices as asked: fake CPU devices by
default (`configure_devices` sets their count before JAX starts), or the real ones.

XLA's memory analysis of the compiled program gives per-device bytes (arguments: the pool
shards and the splits; outputs; temporaries: the merged model, activations, logits); its
cost analysis gives FLOPs and bytes accessed per device per candidate (XLA counts a
loop's body once, so a generate task's decoding counts one step: said in the output). A deep model is compiled at two small depths and every figure extrapolated
linearly to the full depth (`DEPTHS`; said in the output), since an unrolled 32-80 layer
program on 64 fake devices takes minutes to compile on a small machine.

A roofline bound on the time of one generation (P candidates) on `--device_kind` uses
`accelerators`' datasheet figures: P x max(FLOPs / peak, bytes accessed / bandwidth) per
device. It is a lower bound, not a prediction. Memory is XLA's CPU compile of the same
program: the arguments and outputs are what any backend holds; temporaries are the CPU
compiler's buffer assignment, which a TPU or GPU compile can lay out differently.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from recycle_jax import placed_pool
from recycle_jax.checkpoint_io import checkpoints, pool_manifest
from recycle_jax.evaluation import scorers, task_data
from recycle_jax.merging import kernels
from recycle_jax.models import decoding, partitioning, transformer
from recycle_jax.runtime import accelerators
from recycle_jax.runtime.errors import check
from recycle_jax.search import population

PyTree = Any
GiB = 2**30
DEPTHS = (1, 2)  # layers compiled when the model is deeper than FULL_DEPTH_MAX
FULL_DEPTH_MAX = 4
KINDS = ("choice", "exact", "generate")
DEFAULT_TASK = "choice:examples=128,choices=4,length=256"


# ----------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class TaskShape:
  """One split's shape: E examples of L tokens (prompt + continuation), C choices each
  (choice), or prompts of L tokens continued by `max_new` tokens (generate)."""
  kind: str
  examples: int
  length: int
  choices: int = 1
  max_new: int = 0

  def __str__(self) -> str:
    extra = {"choice": f" x {self.choices} choices", "generate": f" + {self.max_new} new"}
    return f"{self.kind} {self.examples} x {self.length}{extra.get(self.kind, '')}"


def parse_task(spec: str) -> TaskShape:
  """'choice:examples=128,choices=4,length=256' | 'exact:examples=E,length=L' |
  'generate:examples=E,length=L,max_new=M'."""
  fix = f"write KIND:examples=E,length=L[,choices=C][,max_new=M], e.g. {DEFAULT_TASK}"
  kind, _, rest = spec.partition(":")
  check(kind in KINDS, f"unknown task kind {kind!r} in {spec!r}", "--task",
        f"choose from {', '.join(KINDS)}; {fix}")
  fields = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    check(key in ("examples", "length", "choices", "max_new") and value.isdigit()
          and int(value) > 0, f"bad field {item!r} in {spec!r}", "--task", fix)
    fields[key] = int(value)
  check("examples" in fields and "length" in fields, f"{spec!r} needs examples and length",
        "--task", fix)
  check(kind != "generate" or "max_new" in fields, f"{spec!r} needs max_new", "--task", fix)
  return TaskShape(kind, **fields)


def parse_mesh(spec: str, devices: int | None = None) -> tuple[int, int]:
  """'data:8,model:8' -> (8, 8). data:-1 takes the rest of `devices` (--devices); given
  `devices`, the mesh must use exactly them."""
  fix = "write --mesh=data:D,model:M (data:-1 with --devices=N takes the rest)"
  sizes = {}
  for item in spec.split(","):
    m = re.fullmatch(r"\s*(data|model)\s*:\s*(-1|\d+)\s*", item)
    check(m is not None, f"bad mesh axis {item!r}", "--mesh", fix)
    sizes[m.group(1)] = int(m.group(2))
  data, model = sizes.get("data", -1), sizes.get("model", 1)
  check(model > 0 and data != 0, f"mesh {spec!r} has an empty axis", "--mesh", fix)
  if devices is None:
    check(data > 0, f"mesh {spec!r} needs --devices for data:-1", "--mesh", fix)
    return data, model
  check(devices % model == 0, f"model:{model} does not divide the {devices} devices",
        "--mesh", f"choose a model axis that divides {devices}")
  if data == -1:
    data = devices // model
  check(data * model == devices, f"mesh data:{data} x model:{model} = {data * model} "
        f"devices, not the {devices} devices", "--mesh", f"make data x model = {devices}")
  return data, model


def pool_spec(arg: str):
  """--pool: a manifest (pool.json or its directory), or Hugging Face folders separated
  by commas (named by their directory names)."""
  paths = [p for p in arg.split(",") if p]
  if len(paths) > 1 or checkpoints.is_hf_folder(paths[0] if paths else ""):
    return [(os.path.basename(os.path.normpath(p)), p) for p in paths]
  return arg


def configure_devices(count: int) -> None:
  """`count` fake CPU devices for the plan's mesh; before JAX starts its backends (the CLI
  calls it first), else the count must already be there."""
  from jax._src import xla_bridge  # (no public 'are backends up' query)
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_num_cpu_devices", count)
  have = len(jax.devices("cpu"))
  check(have >= count, f"the mesh needs {count} CPU devices but JAX started with {have}",
        "--mesh", "run plan in its own process (the CLI sets the count before JAX starts)")


# ----------------------------------------------------------------------------- programs

def synthetic_split(shape: TaskShape, vocab_size: int, seed: int = 0) -> task_data.TaskData:
  """A split of `shape` with random tokens (host arrays), laid out as a real one (packed
  rows for choice and exact; prompts for generate)."""
  rng = np.random.default_rng(seed)
  tok = lambda n: rng.integers(3, vocab_size, n).tolist()  # noqa: E731 (above the specials)
  name = f"plan_{shape.kind}"
  if shape.kind == "choice":
    half = shape.length // 2
    return task_data.choice_data(name, [tok(half) for _ in range(shape.examples)],
                                 [[tok(shape.length - half) for _ in range(shape.choices)]
                                  for _ in range(shape.examples)],
                                 [0] * shape.examples)
  if shape.kind == "exact":
    half = shape.length // 2
    tokens = np.asarray([tok(shape.length) for _ in range(shape.examples)], np.int32)
    mask = np.zeros(tokens.shape, bool)
    mask[:, half:] = True
    d = task_data.TaskData(tokens=tokens, target_mask=mask, kind="exact", name=name)
    return d.replace(packed=task_data.pack(d))
  prompts = np.asarray([tok(shape.length) for _ in range(shape.examples)], np.int32)
  return task_data.TaskData(
      tokens=prompts, target_mask=np.zeros(prompts.shape, bool), kind="generate", name=name,
      prompts=prompts, prompt_lens=np.full(shape.examples, shape.length, np.int32),
      stop_ids=decoding.stop_ids([], transformer.EOS_ID), max_new=shape.max_new)


def at_depth(cfg: transformer.ModelConfig, abstract: PyTree, layers: int):
  """The config and parameter tree cut to its first `layers` blocks."""
  if layers >= cfg.num_layers:
    return cfg, abstract
  types = cfg.layer_types[:layers] if cfg.layer_types else ()
  keep = lambda k: not (m := re.fullmatch(r"layer_(\d+)", k)) or int(m.group(1)) < layers  # noqa: E731
  return (dataclasses.replace(cfg, num_layers=layers, layer_types=types),
          {k: v for k, v in abstract.items() if keep(k)})


@dataclasses.dataclass(frozen=True)
class Figures:
  """One compile's per-device figures."""
  argument_bytes: float
  output_bytes: float
  temp_bytes: float
  alias_bytes: float
  flops: float  # one candidate, per device
  bytes_accessed: float  # one candidate, per device
  compile_s: float

  @property
  def total_bytes(self) -> float:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  def extrapolate(self, other: "Figures", k1: int, k2: int, depth: int) -> "Figures":
    """Linear in depth through (k1, self) and (k2, other), evaluated at `depth`."""
    f = (depth - k1) / (k2 - k1)
    return Figures(**{k: getattr(self, k) + f * (getattr(other, k) - getattr(self, k))
                      for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                "alias_bytes", "flops", "bytes_accessed")},
                   compile_s=self.compile_s + other.compile_s)


def _sharded(abstract: PyTree, mesh: Mesh) -> PyTree:
  return partitioning.with_shardings(abstract, partitioning.param_shardings(abstract, mesh))


def _abstract_datas(datas, mesh):
  """The placed splits as ShapeDtypeStructs with their shardings."""
  placed = task_data.place(tuple(datas), mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      placed)


def compile_figures(cfg: transformer.ModelConfig, abstract: PyTree, n: int, mesh: Mesh,
                    datas, size: int, mode: str, batch_size: int) -> Figures:
  """Compiles the population program: its memory analysis, and its cost analysis per
  candidate. XLA counts a loop's body once: in 'map' mode the population's cost is one
  candidate's, in 'vmap' mode P candidates'. Scoring in chunks (batch_size) is a loop
  too, so the cost then comes from a second compile without chunks (same FLOPs)."""
  pool = tuple(_sharded(abstract, mesh) for _ in range(n))
  rep = partitioning.replicated(mesh)

  def compiled(batch: int):
    score = scorers.make_scorer(transformer.Decoder(cfg), "teacher_forced", batch)
    fn = population.make_population_fn(score, mode, kernels.linear)
    points = jax.ShapeDtypeStruct((size, n), jnp.float32, sharding=rep)
    return jax.jit(fn, out_shardings=rep).lower(points, pool, datas).compile()

  t0 = time.perf_counter()
  program = compiled(batch_size)
  compile_s = time.perf_counter() - t0
  mem = program.memory_analysis()
  cost = (compiled(0) if batch_size else program).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: a list
  per = size if mode == "vmap" else 1
  return Figures(mem.argument_size_in_bytes, mem.output_size_in_bytes,
                 mem.temp_size_in_bytes, mem.alias_size_in_bytes,
                 float(cost.get("flops", 0.0)) / per,
                 float(cost.get("bytes accessed", 0.0)) / per, compile_s)


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class _MeshShape:  # what partitioning.spec_for reads of a mesh
  shape: dict


def param_bytes_per_device(abstract: PyTree, data: int, model: int) -> float:
  """One parameter tree's bytes on a device of a data x model mesh, by the sharding rules
  (a dimension the model axis does not divide stays replicated)."""
  mesh = _MeshShape({"data": data, "model": model})
  total = 0.0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    spec = partitioning.spec_for(partitioning.path_str(path), x.shape, mesh,
                                 partitioning.DEFAULT_RULES)
    total += x.size * np.dtype(x.dtype).itemsize / math.prod(
        mesh.shape[a] for a in spec if a is not None)
  return total


def plan(pool_spec, mesh: tuple[int, int], tasks: Sequence[TaskShape], population_size:
         int | None = None, mode: str = "map", device_kind: str | None = None,
         batch_size: int = 0, full_depth: bool = False, devices=None) -> dict:
  """The plan as one JSON-able record (see the module docstring)."""
  acc = accelerators.get(device_kind) if device_kind else None
  check(mode in ("map", "vmap"), f"unknown population mode {mode!r}", "--mode",
        "choose map (one merge at a time) or vmap (all P at once)")
  pool = pool_manifest.load_pool(pool_spec)
  meta = checkpoints.validate_pool(pool)  # metadata only
  cfg = placed_pool.model_config_from(meta, pool.entries[0].path)
  abstract = meta.abstract
  n = len(pool)
  size = population_size or 4 + int(math.floor(3 * math.log(n)))
  data, model = mesh
  devs = np.asarray(devices if devices is not None else jax.devices("cpu")[:data * model])
  check(devs.size == data * model, f"mesh data:{data} x model:{model} needs "
        f"{data * model} devices, {devs.size} available", "--mesh",
        "choose a mesh of the available devices")
  mesh_ = Mesh(devs.reshape(data, model), ("data", "model"))
  datas = _abstract_datas([synthetic_split(t, cfg.vocab_size, i) for i, t in enumerate(tasks)],
                          mesh_)
  depth = cfg.num_layers
  notes = [f"{t}: XLA's cost counts one decoding step of {t.max_new}" for t in tasks
           if t.kind == "generate"]
  if full_depth or depth <= FULL_DEPTH_MAX:
    fig = compile_figures(cfg, abstract, n, mesh_, datas, size, mode, batch_size)
    how = f"compiled at the full depth ({depth} layers)"
  else:
    k1, k2 = DEPTHS
    figs = [compile_figures(*at_depth(cfg, abstract, k), n, mesh_, datas, size, mode,
                            batch_size) for k in DEPTHS]
    fig = figs[0].extrapolate(figs[1], k1, k2, depth)
    notes.append("per device at " + ", ".join(
        f"{k} layer{'s' if k > 1 else ''}: {_gib(f.total_bytes)} (temporaries "
        f"{_gib(f.temp_bytes)})" for k, f in zip(DEPTHS, figs)))
    how = (f"compiled at {k1} and {k2} layers and extrapolated linearly to {depth} "
           f"(--full_depth compiles all {depth}); compile time is the two compiles'")
  pool_bytes = population.tree_bytes(abstract)
  dtype = np.dtype(jax.tree.leaves(abstract)[0].dtype)
  if dtype.itemsize < 4 and devs.flat[0].platform == "cpu":
    notes.append(f"XLA's CPU compile holds float32 copies of the {dtype.name} pool members "
                 "for the merge (measured: a float32 pool does not have them): about "
                 f"{_gib(2 * n * param_bytes_per_device(abstract, data, model))} of the "
                 "temporaries; a TPU or GPU compile (--on_devices) may fuse them away")
  out = {
      "pool": {"checkpoints": n, "family": cfg.family, "layers": depth,
               "params_per_checkpoint": int(sum(x.size for x in jax.tree.leaves(abstract))),
               "bytes_per_checkpoint": int(pool_bytes),
               "dtype": dtype.name},
      "mesh": {"data": data, "model": model, "devices": data * model,
               "compiled_on": f"{devs.size} x {devs.flat[0].device_kind}"},
      "tasks": [str(t) for t in tasks], "population_size": size, "mode": mode,
      "batch_size": batch_size, "how": how,
      "per_device_bytes": int(fig.total_bytes),
      "argument_bytes": int(fig.argument_bytes), "output_bytes": int(fig.output_bytes),
      "temp_bytes": int(fig.temp_bytes),
      "pool_bytes_per_device": int(n * param_bytes_per_device(abstract, data, model)),
      "flops_per_candidate": fig.flops * data * model,
      "flops_per_candidate_per_device": fig.flops,
      "bytes_accessed_per_candidate_per_device": fig.bytes_accessed,
      "compile_s": round(fig.compile_s, 2),
      "device_kind": acc.name if acc else None, "fits": None, "notes": notes}
  if acc:
    t = max(fig.flops / acc.peak_flops, fig.bytes_accessed / acc.hbm_bandwidth)
    out.update({
        "device_hbm_bytes": acc.hbm_bytes, "device_usable_bytes": acc.usable_bytes,
        "fits": fig.total_bytes <= acc.usable_bytes,
        "roofline_s_per_generation": size * t,
        "roofline_bound": "compute" if fig.flops / acc.peak_flops >= fig.bytes_accessed /
        acc.hbm_bandwidth else "memory bandwidth"})
    if not out["fits"]:
      out["short_by_bytes"] = int(fig.total_bytes - acc.usable_bytes)
      out["advice"] = advice(out, abstract, n, data, model, acc, mode, batch_size)
  return out


def advice(out: dict, abstract: PyTree, n: int, data: int, model: int,
           acc: accelerators.Accelerator, mode: str, batch_size: int) -> list[str]:
  """What to change when the plan does not fit, most effective first. A larger model
  axis is estimated from the parameter shardings (N pool trees + one merge per device),
  the rest of the plan's bytes kept as they are."""
  tips = []
  if mode == "vmap":
    tips.append("--mode=map: one merged copy at a time instead of P")
  devices = data * model
  pool_and_merge = lambda d, m: param_bytes_per_device(abstract, d, m) * (n + 1)  # noqa: E731
  rest = max(out["per_device_bytes"] - pool_and_merge(data, model), 0)
  larger = [m for m in (2**k for k in range(1, int(math.log2(devices)) + 1))
            if m > model and devices % m == 0]
  fits = [m for m in larger if pool_and_merge(devices // m, m) + rest <= acc.usable_bytes]
  if fits:
    m = fits[0]
    tips.append(f"a larger model axis: --mesh=data:{devices // m},model:{m} (about "
                f"{_gib(pool_and_merge(devices // m, m) + rest)} per device, estimated from "
                "the parameter shardings)")
  elif larger and pool_and_merge(1, devices) <= acc.usable_bytes:
    m = next(m for m in larger if pool_and_merge(devices // m, m) <= acc.usable_bytes)
    tips.append(f"--mesh=data:{devices // m},model:{m} brings the pool and one merge to "
                f"about {_gib(pool_and_merge(devices // m, m))} per device, but the other "
                f"{_gib(rest)} (temporaries) must shrink too")
  else:
    tips.append(f"more devices or fewer checkpoints: even model:{devices} leaves about "
                f"{_gib(pool_and_merge(1, devices))} of pool and merge per device, over "
                f"{acc.name}'s usable {_gib(acc.usable_bytes)}")
  if out["temp_bytes"] > 0.25 * out["per_device_bytes"] and not batch_size:
    tips.append("--batch_size=B: score examples B at a time (fewer activations and logits "
                "live at once)")
  return tips


def _gib(x: float) -> str:
  return f"{x / GiB:,.2f} GiB"


def text(out: dict) -> str:
  """The plan for people."""
  p = out["pool"]
  lines = [
      f"pool: {p['checkpoints']} x {p['family']} ({p['layers']} layers, "
      f"{p['params_per_checkpoint'] / 1e9:.2f}B params, {_gib(p['bytes_per_checkpoint'])} "
      f"{p['dtype']} each)",
      f"mesh: data:{out['mesh']['data']} x model:{out['mesh']['model']} = "
      f"{out['mesh']['devices']} devices (compiled on {out['mesh']['compiled_on']})",
      f"program: population {out['population_size']} in '{out['mode']}' mode; tasks: "
      f"{'; '.join(out['tasks'])}",
      f"how: {out['how']}; compile {out['compile_s']:.1f} s",
      f"per device: {_gib(out['per_device_bytes'])} = arguments "
      f"{_gib(out['argument_bytes'])} (pool shards {_gib(out['pool_bytes_per_device'])}) + "
      f"outputs {_gib(out['output_bytes'])} + temporaries {_gib(out['temp_bytes'])}",
      f"per candidate: {out['flops_per_candidate']:.3e} FLOPs "
      f"({out['flops_per_candidate_per_device']:.3e} per device), "
      f"{_gib(out['bytes_accessed_per_candidate_per_device'])} accessed per device"]
  if out["device_kind"]:
    verdict = ("fits" if out["fits"] else
               f"does NOT fit: {_gib(out['short_by_bytes'])} over")
    lines.append(f"on {out['device_kind']}: {verdict} ({_gib(out['device_usable_bytes'])} "
                 f"usable of {_gib(out['device_hbm_bytes'])} HBM)")
    lines.append(f"roofline bound per generation: >= {out['roofline_s_per_generation']:.3g} s "
                 f"({out['roofline_bound']}-bound; a lower bound from datasheet peaks, "
                 "not a prediction)")
    for tip in out.get("advice", ()):
      lines.append(f"  change: {tip}")
  lines += [f"note: {n}" for n in out["notes"]]
  return "\n".join(lines)
