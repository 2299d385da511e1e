"""Hugging Face folders as pool members, read in place, and merges written as such folders.

Reading: a folder (config.json + model.safetensors, or shards listed by
model.safetensors.index.json) is validated from config.json and the safetensors headers
alone (`safetensors_io.read_header`: every tensor's byte range checked against the file's
size; names and shapes against the family's mapping, `hf_reader.inspect_hf`), then restored
straight into the mesh's shardings: each parameter is a `jax.make_array_from_callback`
whose callback reads only the requested slice of an `np.memmap` over the tensor's bytes
(transposed per slice where the family stores [out, in]). Nothing is converted on disk.

Writing (`save_folder`): sharded safetensors with model.safetensors.index.json,
config.json with the pool's values (its source config.json's token ids, context length and
RoPE settings), generation_config.json (so `generate` stops at EOS), and the pool's
tokenizer files; written into a temporary sibling renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.runtime import outputs
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import hf_reader
from recycle_jax.models import families, transformer
from recycle_jax.checkpoint_io import safetensors_io, tokenizer_files
from recycle_jax.runtime.errors import check

PyTree = Any
SHARD_BYTES = 2 << 30


def memmap(t: safetensors_io.TensorInfo) -> np.ndarray:
  """The tensor's bytes mapped read-only: a slice of it reads only its pages."""
  if 0 in t.shape or not t.shape:
    return np.fromfile(t.file, t.dtype, int(np.prod(t.shape)), offset=t.start
                       ).reshape(t.shape)
  return np.memmap(t.file, t.dtype, mode="r", offset=t.start, shape=t.shape)


@dataclasses.dataclass(frozen=True)
class Folder:
  """A Hugging Face folder validated from config.json and its safetensors headers."""
  model: hf_reader.HFModel  # family, ModelConfig, config.json, tensor -> file and shape
  tensors: dict[str, safetensors_io.TensorInfo]

  @property
  def cfg(self) -> transformer.ModelConfig:
    return self.model.cfg


def open_folder(path: str, name: str | None = None) -> Folder:
  where = f"checkpoint {name!r} at {path}" if name else path
  check(os.path.isdir(path), "checkpoint directory not found", where,
        "check the path in the pool manifest")
  model = hf_reader.inspect_hf(os.path.abspath(path))  # family, config, names and shapes
  tensors = {}
  for file in sorted(set(model.files.values())):
    tensors.update({k: v for k, v in safetensors_io.read_header(file).items()
                    if model.files.get(k) == file})
  return Folder(model, tensors)


def read_metadata(path: str, name: str | None = None) -> checkpoint_meta.CheckpointMeta:
  """The folder as checkpoint metadata: the params tree's shapes (model dtype) and the
  model config, as a converted checkpoint records them. No tensor is read."""
  f = open_folder(path, name)
  custom = {checkpoint_meta.META_KEY: {
      "model": f.cfg.to_dict(), "hf_config": f.model.hf_config,
      "source": {"format": "huggingface", "path": os.path.abspath(path)}}}
  return checkpoint_meta.CheckpointMeta(families.param_shapes(f.cfg), custom)


def restore(path: str, abstract: PyTree, name: str | None = None) -> PyTree:
  """The params of the folder at `path`, each placed by the sharding in `abstract` (one
  device when it has none), reading only each device's slices from the mapped files."""
  f = open_folder(path, name)
  out: dict = {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for t in families.tensor_map(f.cfg):
    want = families.get_path(abstract, t.path)
    sharding = getattr(want, "sharding", None) or default
    src, dtype, seen = f.tensors[t.hf_name], np.dtype(want.dtype), {}

    def read(index, src=src, t=t, dtype=dtype, seen=seen):
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in seen:  # a slice replicated on several devices is read once
        mm = memmap(src)  # dropped with the slice's copy
        part = mm[tuple(index)[::-1]].T if t.transpose else mm[tuple(index)]
        seen[key] = np.ascontiguousarray(part, dtype=dtype)
      return seen[key]

    families.set_path(out, t.path, jax.make_array_from_callback(
        tuple(want.shape), sharding, read))
    seen.clear()
  return out


# ----------------------------------------------------------------------------- writing

def _generation_config(config: Mapping, tokenizer: tokenizer_files.Tokenizer | None) -> dict:
  ids = {k: config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
  if tokenizer is not None:
    for k in ids:
      ids[k] = ids[k] if ids[k] is not None else getattr(tokenizer, f"{k}_id")
  return {f"{k}_token_id": v for k, v in ids.items() if v is not None}


def hf_config(cfg: transformer.ModelConfig, base: Mapping | None,
              tokenizer: tokenizer_files.Tokenizer | None) -> dict:
  """config.json of a merge: the family's mapping of `cfg` over the pool's source config
  (`base`: token ids, kept as they are, null included); without one, the ids the
  tokenizer knows."""
  base = dict(base or {})
  out = families.to_hf_config(cfg, base)
  gen = _generation_config(out, tokenizer)
  out.update({k: v for k, v in gen.items() if out.get(k) is None and k not in base})
  return out


def save_folder(path: str, cfg: transformer.ModelConfig, params: PyTree,
                base: Mapping | None = None,
                tokenizer: tokenizer_files.Tokenizer | None = None, overwrite: bool = False,
                shard_bytes: int = SHARD_BYTES) -> None:
  """Writes `params` as a complete Hugging Face folder at `path` (see the module
  docstring), through a temporary sibling renamed into place when complete."""
  check(cfg is not None and cfg.family in families.REGISTRY, "the merge has no model family "
        "with a Hugging Face layout", "--format=hf", "write Orbax (drop --format=hf)")
  maps = families.tensor_map(cfg)
  verify = safetensors_io.reads_back([t.hf_name for t in maps])
  with outputs.writing(path, overwrite, verify) as tmp:
    os.makedirs(tmp)
    leaves = [families.get_path(params, t.path) for t in maps]
    writer = safetensors_io.Writer(tmp, [(t.hf_name, np.dtype(x.dtype), t.hf_shape(x.shape))
                                         for t, x in zip(maps, leaves)], shard_bytes)
    for t, x in zip(maps, leaves):  # one tensor on the host at a time
      writer.write(t.hf_name, t.to_hf(np.asarray(jax.device_get(x))))
    writer.close()
    _write_extras(tmp, cfg, base, tokenizer)


def _write_extras(folder: str, cfg: transformer.ModelConfig, base: Mapping | None,
                  tokenizer: tokenizer_files.Tokenizer | None) -> None:
  """config.json, generation_config.json and the tokenizer files of a written folder."""
  config = hf_config(cfg, base, tokenizer)
  for name, obj in ((hf_reader.HF_CONFIG, config),
                    ("generation_config.json", _generation_config(config, tokenizer))):
    outputs.write_text(os.path.join(folder, name), json.dumps(obj, indent=1))
  tokenizer_files.write_files(tokenizer, folder)


def stream_merge(pool: pool_manifest.Pool, alphas, output: str, overwrite: bool = False,
                 tokenizer: tokenizer_files.Tokenizer | None = None,
                 memory_budget_mb: float = 256, fsync: bool = True,
                 shard_bytes: int = SHARD_BYTES) -> None:
  """Linear merge of a pool of Hugging Face folders, out of core, into a Hugging Face
  folder: each tensor is read once from every member in row blocks of about
  `memory_budget_mb` (mapped, dropped after each block), summed in float32, written once
  in the members' dtype. Peak memory above the runtime is about the budget plus the
  largest output tensor."""
  check(memory_budget_mb > 0, f"memory budget must be positive, got {memory_budget_mb}",
        "--memory_budget_mb")
  folders = [open_folder(e.path, e.name) for e in pool.entries]
  cfg, alphas = folders[0].cfg, [float(a) for a in alphas]
  output = os.path.abspath(output)
  outputs.check_output(output, pool.paths, overwrite)
  maps = families.tensor_map(cfg)
  verify = safetensors_io.reads_back([t.hf_name for t in maps])
  with outputs.writing(output, overwrite, verify) as tmp:
    os.makedirs(tmp)
    first = [folders[0].tensors[t.hf_name] for t in maps]
    writer = safetensors_io.Writer(tmp, [(t.hf_name, x.dtype, x.shape)
                                         for t, x in zip(maps, first)], shard_bytes)
    budget = max(1, int(memory_budget_mb * 2**20))
    for t, ref in zip(maps, first):
      row = max(1, int(np.prod(ref.shape[1:])) * 4)
      step = max(1, budget // (row * (len(folders) + 1)))
      out = np.empty(ref.shape, ref.dtype)
      for r in range(0, max(ref.shape[0] if ref.shape else 1, 1), step):
        acc = None
        for a, f, e in zip(alphas, folders, pool.entries):
          info = f.tensors[t.hf_name]
          check(info.shape == ref.shape, f"tensor {t.hf_name!r} has shape {info.shape} but "
                f"{pool.entries[0].name!r} has {ref.shape}", f"checkpoint {e.name!r}",
                "every pool member must share one architecture")
          mm = memmap(info)
          block = (mm[r:r + step] if ref.shape else mm).astype(np.float32)
          del mm
          acc = a * block if acc is None else acc + a * block
        check(bool(np.all(np.isfinite(acc))), f"the merge of tensor {t.hf_name!r} has NaN "
              "or Inf values", "--pool", "find the member holding them (merge without "
              "--streaming names it); nothing was written")
        if ref.shape:
          out[r:r + step] = acc.astype(ref.dtype)
        else:
          out[...] = acc.astype(ref.dtype)
      writer.write(t.hf_name, out)
      del out
    writer.close(fsync)
    _write_extras(tmp, cfg, folders[0].model.hf_config, tokenizer)
