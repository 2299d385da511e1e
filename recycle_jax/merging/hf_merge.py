"""Merging Hugging Face folders by a mergekit config, tensor by tensor.

Each tensor is read once from every input (positioned reads), merged by a jitted kernel in
float32 (compiled once per shape and method options; the per-tensor numbers such as
weights, densities, lambda or t, which gradients vary by layer, are arguments), cast to the
output dtype and written once at its place in the sharded safetensors output. Every
tensor's parameters are resolved, and every input checked, before anything is written; the
output is a sibling `.partial-*` folder renamed into place when complete, with config.json
(dtype updated), generation_config.json and the tokenizer files of the donor (the
tokenizer source, else the base, else the first model), and the config as
mergekit_config.yml, as mergekit writes them.

Sparsification follows mergekit's rules here (exactly max(1, floor(density * size))
entries kept, random drops rescaled to the L1 norm when `rescale`, a zero sign sum counted
positive): see `task_vectors`. The random masks are JAX's (seeded), not torch's, so DARE
and DELLA agree with mergekit in keep fraction and rescaling, not entry by entry.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from recycle_jax.merging import geometric, kernels, selection, task_vectors
from recycle_jax.checkpoint_io import (hf_folder, mergekit_config, safetensors_io,
                                       tokenizer_files)
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import check

# mergekit's generalized task arithmetic methods: (sparsification rule, sign consensus).
GTA = {"task_arithmetic": (None, False), "ties": ("magnitude", True),
       "dare_ties": ("random", True), "dare_linear": ("random", False),
       "breadcrumbs": ("magnitude_outliers", False),
       "breadcrumbs_ties": ("magnitude_outliers", True),
       "della": ("della_magprune", True), "della_linear": ("della_magprune", False)}
FLOATS = ("weight", "density", "gamma", "epsilon")  # per input, traced
SHARED_FLOATS = ("lambda", "t", "select_topk")  # per tensor, traced (layer gradients)
TAGALONG = ("generation_config.json",)
DONOR_TOKENIZER = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
                   "chat_template.jinja", "chat_template.json")


@functools.partial(jax.jit, static_argnames=("method", "base", "static", "out_dtype"))
def merge_tensor(xs, per, shared, counts, key, *, method: str, base: int | None,
                 static: tuple, out_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One tensor of a mergekit merge, and whether its inputs [N] and its output are all
  finite (checked in the same compiled program: no pass over the tensors in numpy). For
  'linear' the inputs' flags are all True: a NaN or Inf in any input (whatever its
  weight: 0 * Inf is NaN) makes the output non-finite, which the caller then traces back.

  xs: the inputs' tensors, in the plan's input order; per: {name: [N] float32} per input
  (0 where a parameter does not apply); shared: {name: float32 scalar}; counts: [N, 2]
  int32 exact trim counts; base: the base's position in xs or None; static: the method's
  boolean and integer options as sorted (name, value) pairs.
  """
  opt = dict(static)
  finite = (jnp.ones(len(xs), bool) if method == "linear" else
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
  xs = [x.astype(jnp.float32) for x in xs]
  nb = [i for i in range(len(xs)) if i != base]
  b = None if base is None else xs[base]
  w = per.get("weight")
  if method == "linear":
    out = sum(w[i] * x for i, x in enumerate(xs))
    out = out / jnp.sum(w) if opt["normalize"] else out
  elif method in GTA:
    sparsify, consensus = GTA[method]
    take = lambda v: v[jnp.asarray(nb)]
    out = task_vectors.combine(
        b, [xs[i] for i in nb], take(w), shared["lambda"], sparsify=sparsify,
        density=take(per["density"]), consensus=consensus, normalize=opt["normalize"],
        mergekit_rules=True, rescale=opt["rescale"], gamma=take(per["gamma"]),
        epsilon=take(per["epsilon"]), key=key, counts=counts[jnp.asarray(nb)])
  elif method == "slerp":
    out = kernels.slerp_tensors(shared["t"], b, xs[nb[0]])
  elif method == "nuslerp":
    out = geometric.nuslerp_leaf(geometric.nuslerp_t(w[nb[0]], w[nb[1]]), xs[nb[0]],
                                 xs[nb[1]], b, opt["nuslerp_row_wise"], opt["nuslerp_flatten"])
  elif method == "multislerp":
    out = geometric.multislerp_leaf([xs[i] for i in nb], w[jnp.asarray(nb)], b,
                                    opt["normalize_weights"], opt["eps"])
  elif method == "karcher":
    out = geometric.karcher_leaf(xs, jnp.full(len(xs), 1.0 / len(xs)), opt["max_iter"],
                                 opt["tol"])
  elif method == "model_stock":
    out = geometric.model_stock_leaf(b, [xs[i] for i in nb], None, opt["filter_wise"])
  elif method == "passthrough":
    out = xs[0] if opt["scale"] is None else xs[0] * opt["scale"]
  elif method == "sce":
    out = selection.sce_leaf(b, [xs[i] for i in nb], None, shared["select_topk"])
  elif method == "nearswap":
    out = selection.nearswap_leaf(b, xs[nb[0]], shared["t"])
  elif method == "arcee_fusion":
    out = selection.arcee_fusion_leaf(b, xs[nb[0]])
  else:
    raise AssertionError(method)
  out = out.astype(out_dtype)
  return out, finite, jnp.all(jnp.isfinite(out))


def _donor(plan: mergekit_config.Plan) -> str:
  return plan.base or plan.inputs[0]


# config.json fields that fine-tunes of one model may change; every other field they share
# must agree (a config that disagrees with its tensors is a damaged or foreign model).
CONFIG_MAY_DIFFER = ("_name_or_path", "transformers_version", "torch_dtype", "dtype",
                     "use_cache", "architectures", "generation_config")


CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _same_configs(plan: mergekit_config.Plan) -> None:
  """Every input's config.json is a JSON object that agrees with the donor's (the output's
  config is the donor's): a field both have, other than token ids and CONFIG_MAY_DIFFER,
  has one value."""
  donor = _donor(plan)
  configs = {}
  for m in plan.inputs:
    path = os.path.join(m, "config.json")
    doc = validation.load_json(path, "model config", "re-save the model's config.json")
    check(isinstance(doc, dict), f"config.json is a {type(doc).__name__}, not an object",
          path, "re-save the model's config.json")
    for k in ("torch_dtype", "dtype"):  # a name transformers knows, or absent
      check(doc.get(k) is None or doc[k] in CONFIG_DTYPES, f"{k} is {doc.get(k)!r:.40}, not "
            "a dtype name", path, f"re-save the model's config.json ({', '.join(CONFIG_DTYPES)})")
    configs[m] = doc
  ref = configs[donor]
  for m, doc in configs.items():
    diff = [k for k in sorted(set(doc) & set(ref)) if k not in CONFIG_MAY_DIFFER and
            not k.endswith("_token_id") and doc[k] != ref[k]]
    check(not diff, f"config.json differs from {donor}'s: " + ", ".join(
        f"{k} {doc[k]!r:.40} vs {ref[k]!r:.40}" for k in diff[:3]), os.path.join(m, "config.json"),
          "merge fine-tunes of one model (one architecture)")


def _same_tokenizers(plan: mergekit_config.Plan) -> None:
  """Embeddings are merged row by row: every input's tokenizer (tokenizer.json,
  tokenizer.model) must be the same file (mergekit would permute embeddings into a joint
  vocabulary; recycle_jax does not)."""
  for m in plan.inputs:  # a damaged file is reported as such, not as a difference
    for name in ("tokenizer.json", "tokenizer_config.json"):
      tokenizer_files.read_json_object(os.path.join(m, name))
  digests = {m: _tokenizer_digest(m) for m in plan.inputs}
  common = collections.Counter(d for d in digests.values() if d).most_common(1)
  if not common:
    return  # no model has tokenizer files: the output has none either
  ref = next(m for m in plan.inputs if digests[m] == common[0][0])
  for m, d in digests.items():
    check(d is not None, f"model {m} has no tokenizer (tokenizer.json or tokenizer.model) "
          f"while {ref} has one: its vocabulary cannot be checked", plan.path,
          "give every model its tokenizer's files")
    check(d == common[0][0], f"model {m}'s tokenizer differs from {ref}'s (its "
          "tokenizer.json or tokenizer.model)", plan.path, "merge models that share one "
          "tokenizer (vocabulary merging is not supported)")


def _tokenizer_digest(folder: str) -> str | None:
  """sha256 of a folder's tokenizer.json and tokenizer.model; None if it has neither."""
  h, found = hashlib.sha256(), False
  for name in ("tokenizer.json", "tokenizer.model"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        h.update(name.encode() + f.read())
      found = True
  return h.hexdigest() if found else None


def plan_tensors(plan: mergekit_config.Plan) -> tuple[dict, list[tuple]]:
  """Checks the inputs (same tensors, shapes) and resolves every tensor's parameters.
  Returns (the inputs' tensor infos, [(name, out dtype, shape, resolved)] in file order)."""
  infos = {m: safetensors_io.folder_tensors(m) for m in plan.inputs}
  ref = infos[_donor(plan)]
  for m, t in infos.items():
    missing, extra = sorted(set(ref) - set(t)), sorted(set(t) - set(ref))
    check(not missing and not extra, f"model {m} has tensors {'missing' if missing else 'extra'}"
          f" relative to {_donor(plan)}: {(missing or extra)[:3]}", plan.path,
          "merge models of one architecture")
    for name, info in t.items():
      check(info.shape == ref[name].shape, f"tensor {name} has shape {info.shape} in {m}, "
            f"{ref[name].shape} in {_donor(plan)}", plan.path, "merge models of one shape")
  out = []
  for name in sorted(ref, key=lambda n: (ref[n].file, ref[n].start)):
    info = ref[name]
    want = plan.out_dtype or plan.dtype
    floating = jnp.issubdtype(info.dtype, jnp.floating)
    dtype = jnp.dtype(want) if floating and want else info.dtype
    shared, per = plan.resolve(name)
    if plan.method.name == "linear" and shared.get("normalize") and floating:
      check(sum(per[m]["weight"] for m in plan.inputs) != 0, f"the weights of tensor {name} "
            "sum to 0, and linear's normalize divides by their sum", plan.path,
            "give weights that do not sum to zero (or set normalize: false)")
    if plan.method.name in ("della", "della_linear"):
      for m in plan.non_base:
        p = per[m]
        check(p["density"] >= 1 or p["density"] <= 0 or task_vectors.check_della(
            p["density"], p["epsilon"]), f"density {p['density']:g} +- epsilon "
            f"{p['epsilon']:g} is not inside (0, 1) for {os.path.basename(m)}:{name}",
            plan.path, "choose epsilon < min(density, 1 - density)")
    out.append((name, dtype, info.shape, (shared, per)))
  return infos, out


def _arguments(plan, resolved, size):
  """A tensor's resolved parameters as merge_tensor's arguments (0 where one does not
  apply: the base's weight, a method's absent density)."""
  shared, per = resolved
  ins = plan.inputs
  value = lambda m, k: 0.0 if per[m].get(k) is None else per[m][k]
  per_arr = {k: jnp.asarray([value(m, k) for m in ins], jnp.float32) for k in FLOATS}
  shared_arr = {k: jnp.float32(v) for k, v in shared.items() if k in SHARED_FLOATS}
  static = tuple(sorted((k, v) for k, v in shared.items() if k not in SHARED_FLOATS))
  if plan.method.name == "passthrough":
    static += (("scale", per[ins[0]]["scale"]),)
  counts = jnp.asarray([task_vectors.host_counts(per[m].get("density", 1.0),
                                                 per[m].get("gamma", 0.0), size)
                        for m in ins], jnp.int32)
  return per_arr, shared_arr, counts, static


def _write_extras(plan: mergekit_config.Plan, tmp: str, out_dtype: str | None) -> None:
  donor = _donor(plan)
  with open(os.path.join(donor, "config.json")) as f:
    cfg = json.load(f)
  if out_dtype:
    for k in ("torch_dtype", "dtype"):
      if k in cfg or k == "dtype":
        cfg[k] = out_dtype
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  tok = plan.tokenizer_source or donor
  for src, names in ((donor, TAGALONG), (tok, DONOR_TOKENIZER)):
    for n in names:
      if os.path.isfile(os.path.join(src, n)):
        shutil.copyfile(os.path.join(src, n), os.path.join(tmp, n))
  shutil.copyfile(plan.path, os.path.join(tmp, "mergekit_config.yml"))


IN_FLIGHT_BYTES = 1 << 30  # inputs read and not yet merged, across the worker threads


def run_threaded(fn, items: list[tuple], sizes: list[int], workers: int | None = None,
                 limit: int = IN_FLIGHT_BYTES) -> None:
  """fn(*item) for every item on `workers` threads (one per core by default: reads,
  XLA's kernels and writes release the GIL), at most `limit` bytes of items (`sizes`) in
  flight beyond one per worker. Results are taken in order, so the first failing item's
  error is the one raised; the items after it are not started."""
  workers = workers or os.cpu_count() or 1
  pending = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers, "hf-merge") as ex:
    try:
      for item, size in zip(items, sizes):
        while pending and (len(pending) >= 2 * workers or
                           sum(s for _, s in pending) + size > limit):
          pending.popleft()[0].result()
        pending.append((ex.submit(fn, *item), size))
      while pending:
        pending.popleft()[0].result()
    finally:
      for f, _ in pending:
        f.cancel()


def merge(plan: mergekit_config.Plan, output: str, overwrite: bool = False, seed: int = 0,
          max_shard_bytes: int = 5 << 30, fsync: bool = True) -> str:
  """Runs a mergekit plan into a Hugging Face folder at `output`; returns its path."""
  from recycle_jax.runtime import outputs
  output = os.path.abspath(output)
  outputs.check_output(output, list(plan.inputs) + [plan.path], overwrite)
  _same_configs(plan)
  _same_tokenizers(plan)
  infos, tensors = plan_tensors(plan)
  reader = safetensors_io.Reader()
  verify = hf_folder.reads_back([n for n, _, _, _ in tensors])
  try:
    with outputs.writing(output, overwrite, verify) as tmp:
      os.makedirs(tmp)
      writer = safetensors_io.Writer(tmp, [(n, d, s) for n, d, s, _ in tensors],
                                     max_shard_bytes)
      base = plan.inputs.index(plan.base) if plan.base in plan.inputs and \
          plan.method.base != "ignored" else None
      key = jax.random.key(seed)

      def one(i: int, name: str, dtype, shape, resolved) -> None:
        """Reads, merges, checks and writes tensor i (on a worker thread)."""
        xs = [reader.read(infos[m][name]) for m in plan.inputs]
        if not jnp.issubdtype(dtype, jnp.floating):
          writer.write(name, xs[plan.inputs.index(_donor(plan))])  # integer buffers
          return
        per, shared, counts, static = _arguments(plan, resolved, int(np.prod(shape)))
        out, finite, out_finite = merge_tensor(
            xs, per, shared, counts, jax.random.fold_in(key, i), method=plan.method.name,
            base=base, static=static, out_dtype=dtype)
        finite = np.asarray(finite)
        if not out_finite:  # which input, if any, brought it (linear checks none up front)
          finite = finite & np.array([np.isfinite(x).all() for x in xs])
        for m, ok in zip(plan.inputs, finite):  # as `merge --pool` refuses a non-finite
          check(bool(ok), f"model {m} holds NaN or Inf values in tensor "  # member
                f"{name}", plan.path, "repair or drop that model; nothing was written")
        check(bool(out_finite), f"the {plan.method.name} merge of tensor {name} "
              "comes out with NaN or Inf values (from finite models: the parameters)",
              plan.path, "check the method's parameters for that tensor; nothing was written")
        writer.write(name, np.asarray(out))

      run_threaded(one, [(i, *t) for i, t in enumerate(tensors)],
                   [len(plan.inputs) * np.dtype(infos[_donor(plan)][t[0]].dtype).itemsize *
                    int(np.prod(t[2])) for t in tensors])
      writer.close(fsync)
      _write_extras(plan, tmp, plan.out_dtype or plan.dtype)
  finally:
    reader.close()
  return output
