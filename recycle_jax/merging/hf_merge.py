"""Merging Hugging Face folders by a mergekit config (`merge`), or a pool of them by
weights (`merge_pool`, `merge --streaming`), tensor by tensor.

Each tensor is read once from every input (positioned reads), merged in float32, cast to
the output dtype and written once at its place in the sharded safetensors output: 'linear'
in numpy, unit by unit of its byte ranges (`hf_linear`; no JAX), every other method by a
jitted kernel (`hf_kernel`, compiled once per shape and method options; the per-tensor
numbers such as weights, densities, lambda or t, which gradients vary by layer, are
arguments). Work runs on one thread per core (`run_threaded`). Every
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
import hashlib
import json
import os
import shutil

import jax
import numpy as np

from recycle_jax.merging import hf_kernel, hf_linear, task_vectors
from recycle_jax.checkpoint_io import (hf_folder, mergekit_config, pool_manifest,
                                       safetensors_io, tokenizer_files)
from recycle_jax.models import families
from recycle_jax.runtime import outputs, validation
from recycle_jax.runtime.errors import check

TAGALONG = ("generation_config.json",)
DONOR_TOKENIZER = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
                   "chat_template.jinja", "chat_template.json")


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
  configs = {m: os.path.isfile(os.path.join(m, "tokenizer_config.json")) for m in plan.inputs}
  if any(configs.values()):  # special tokens and BOS are set there: a folder lacking it is
    has = next(m for m, c in configs.items() if c)  # incomplete, not another tokenizer
    for m, c in configs.items():
      check(c, f"model {m} has no tokenizer_config.json while {has} has one: its special "
            "tokens cannot be checked", plan.path, "copy the folder whole (save_pretrained "
            "writes tokenizer_config.json)")


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
    floating = info.dtype in safetensors_io.FLOATING
    dtype = np.dtype(want) if floating and want else info.dtype
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
  numpy's ufuncs, XLA's kernels and writes release the GIL), at most `limit` bytes of items (`sizes`) in
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


def _refuse_non_finite(plan: mergekit_config.Plan, name: str, inputs_finite,
                       out_finite: bool) -> None:
  """The input that holds NaN or Inf in tensor `name`, else the output, refused by name."""
  for m, ok in zip(plan.inputs, inputs_finite):  # as `merge --pool` refuses a non-finite
    check(bool(ok), f"model {m} holds NaN or Inf values in tensor {name}",  # member
          plan.path, "repair or drop that model; nothing was written")
  check(bool(out_finite), f"the {plan.method.name} merge of tensor {name} comes out with "
        "NaN or Inf values (from finite models: the parameters)", plan.path,
        "check the method's parameters for that tensor; nothing was written")


def merge(plan: mergekit_config.Plan, output: str, overwrite: bool = False, seed: int = 0,
          max_shard_bytes: int = 5 << 30, fsync: bool = True) -> str:
  """Runs a mergekit plan into a Hugging Face folder at `output`; returns its path."""
  output = os.path.abspath(output)
  outputs.check_output(output, list(plan.inputs) + [plan.path], overwrite)
  _same_configs(plan)
  _same_tokenizers(plan)
  infos, tensors = plan_tensors(plan)
  linear = plan.method.name == "linear"
  reader = safetensors_io.Reader()
  verify = safetensors_io.reads_back([n for n, _, _, _ in tensors])
  try:
    with outputs.writing(output, overwrite, verify) as tmp:
      os.makedirs(tmp)
      writer = safetensors_io.Writer(tmp, [(n, d, s) for n, d, s, _ in tensors],
                                     max_shard_bytes)
      base = plan.inputs.index(plan.base) if plan.base in plan.inputs and \
          plan.method.base != "ignored" else None

      def span(name: str, dtype, start: int, stop: int, w, divisor) -> None:
        """Merges, checks and writes elements [start, stop) of a linear merge's tensor."""
        ins = [infos[m][name] for m in plan.inputs]
        out = hf_linear.merge_range(reader, ins, w, divisor, start, stop, dtype)
        if not np.isfinite(out).all():  # which input, if any, brought it
          _refuse_non_finite(plan, name, [np.isfinite(reader.read_into(
              x, np.empty(stop - start, x.dtype), start)).all() for x in ins], False)
        writer.write_range(name, start, out)

      def one(i: int, name: str, dtype, shape, resolved) -> None:
        """Reads, merges, checks and writes tensor i whole (the kernel's methods)."""
        xs = [reader.read(infos[m][name]) for m in plan.inputs]
        if dtype not in safetensors_io.FLOATING:
          writer.write(name, xs[plan.inputs.index(_donor(plan))])  # integer buffers
          return
        per, shared, counts, static = hf_kernel.arguments(plan, resolved, int(np.prod(shape)))
        out, finite, out_finite = hf_kernel.merge_tensor(
            xs, per, shared, counts, jax.random.fold_in(key, i), method=plan.method.name,
            base=base, static=static, out_dtype=dtype)
        finite = np.asarray(finite)
        if not out_finite:  # which input, if any, brought it
          finite = finite & np.array([np.isfinite(x).all() for x in xs])
        _refuse_non_finite(plan, name, finite, bool(out_finite))
        writer.write(name, np.asarray(out))

      key = jax.random.key(seed)
      work, sizes = [], []
      for i, (name, dtype, shape, resolved) in enumerate(tensors):
        itemsize = infos[_donor(plan)][name].dtype.itemsize
        if linear and dtype in safetensors_io.FLOATING:
          w, divisor = hf_linear.weights(plan.inputs, resolved)
          for start, stop in hf_linear.units(int(np.prod(shape))):
            work.append((span, name, dtype, start, stop, w, divisor))
            sizes.append(len(plan.inputs) * itemsize * (stop - start))
        else:
          work.append((one, i, name, dtype, shape, resolved))
          sizes.append(len(plan.inputs) * itemsize * int(np.prod(shape)))
      run_threaded(lambda fn, *args: fn(*args), work, sizes)
      writer.close(fsync)
      _write_extras(plan, tmp, plan.out_dtype or plan.dtype)
  finally:
    reader.close()
  return output


def merge_pool(pool: pool_manifest.Pool, alphas, output: str, overwrite: bool = False,
               tokenizer: tokenizer_files.Tokenizer | None = None, fsync: bool = True,
               shard_bytes: int = hf_folder.SHARD_BYTES) -> None:
  """`merge --streaming` of a pool of Hugging Face folders (weights `alphas` [N], not
  normalized) into a Hugging Face folder in the members' dtype, out of core: every tensor
  unit by unit of its byte ranges on one thread per core, as a linear `merge` of a config
  (`hf_linear`). Peak memory above the runtime is a few units per thread."""
  folders = [hf_folder.open_folder(e.path, e.name) for e in pool.entries]
  cfg, w = folders[0].cfg, np.asarray([float(a) for a in alphas], np.float32)
  output = os.path.abspath(output)
  outputs.check_output(output, pool.paths, overwrite)
  maps = families.tensor_map(cfg)
  infos = {t.hf_name: [f.tensors[t.hf_name] for f in folders] for t in maps}
  for name, ins in infos.items():
    for e, info in zip(pool.entries, ins):
      check(info.shape == ins[0].shape, f"tensor {name!r} has shape {info.shape} but "
            f"{pool.entries[0].name!r} has {ins[0].shape}", f"checkpoint {e.name!r}",
            "every pool member must share one architecture")
  reader = safetensors_io.Reader()
  try:
    with outputs.writing(output, overwrite, safetensors_io.reads_back(infos)) as tmp:
      os.makedirs(tmp)
      writer = safetensors_io.Writer(tmp, [(n, ins[0].dtype, ins[0].shape)
                                           for n, ins in infos.items()], shard_bytes)

      def span(name: str, start: int, stop: int) -> None:
        out = hf_linear.merge_range(reader, infos[name], w, None, start, stop,
                                    infos[name][0].dtype)
        check(bool(np.isfinite(out).all()), f"the merge of tensor {name!r} has NaN or Inf "
              "values", "--pool", "find the member holding them (merge without "
              "--streaming names it); nothing was written")
        writer.write_range(name, start, out)

      work = [(n, s, e) for n, ins in infos.items()
              for s, e in hf_linear.units(int(np.prod(ins[0].shape)))]
      run_threaded(span, work, [len(w) * infos[n][0].dtype.itemsize * (e - s)
                                for n, s, e in work])
      writer.close(fsync)
      hf_folder.write_extras(tmp, cfg, folders[0].model.hf_config, tokenizer)
  finally:
    reader.close()
