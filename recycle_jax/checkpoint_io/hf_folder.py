"""Hugging Face folders as pool members, read in place, and merges written as such folders.

Reading: a folder (config.json + model.safetensors, or shards listed by
model.safetensors.index.json) is validated from config.json and the safetensors headers
alone (`safetensors_io.read_header`: every tensor's byte range checked against the file's
size; names and shapes against the family's mapping, `hf_reader.inspect_hf`), then restored
straight into the mesh's shardings: each parameter is a `jax.make_array_from_callback`
whose callback reads only the requested slice of an `np.memmap` over the tensor's bytes
(transposed per slice where the family stores [out, in]), or a whole tensor by positioned
reads, into a 64-byte-aligned host array, which XLA's CPU client adopts without a copy.
Nothing is converted on disk.

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


ALIGN = 64  # XLA's CPU client adopts a host buffer aligned so without copying it


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialized C-contiguous array whose data starts at an ALIGN-byte boundary."""
  n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  raw = np.empty(n + ALIGN, np.uint8)
  off = -raw.ctypes.data % ALIGN
  return raw[off:off + n].view(dtype).reshape(shape)


def read_slice(reader: safetensors_io.Reader, src: safetensors_io.TensorInfo, index: tuple,
               transpose: bool, dtype) -> np.ndarray:
  """One device's slice `index` of a parameter (its layout: transposed from the stored
  [out, in] when `transpose`), in `dtype`, in a fresh ALIGN-aligned array: on CPU the
  device adopts it as is, so the weights are in memory once. A whole tensor is read by
  positioned reads (no mapped file pages held in the resident set); a part of one from
  the mapped file, reading only its pages."""
  shape = src.shape[::-1] if transpose else src.shape
  whole = all(s == slice(None) or (s.start in (None, 0) and s.stop in (None, n) and
                                   s.step in (None, 1)) for s, n in zip(index, shape))
  if whole and not transpose and src.dtype == dtype:
    out = aligned_empty(src.shape, dtype)
    reader.read_into(src, out.reshape(-1))
    return out
  if whole:
    stored = np.empty(src.shape, src.dtype)
    reader.read_into(src, stored.reshape(-1))
  else:
    stored = memmap(src)
  part = stored[tuple(index)[::-1]].T if transpose else stored[tuple(index)]
  out = aligned_empty(part.shape, dtype)
  np.copyto(out, part, casting="unsafe")
  return out


def restore(path: str, abstract: PyTree, name: str | None = None) -> PyTree:
  """The params of the folder at `path`, each placed by the sharding in `abstract` (one
  device when it has none), reading only each device's slices (`read_slice`)."""
  f = open_folder(path, name)
  out: dict = {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  reader = safetensors_io.Reader()
  try:
    for t in families.tensor_map(f.cfg):
      want = families.get_path(abstract, t.path)
      sharding = getattr(want, "sharding", None) or default
      src, dtype, seen = f.tensors[t.hf_name], np.dtype(want.dtype), {}

      def read(index, src=src, t=t, dtype=dtype, seen=seen):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in seen:  # a slice replicated on several devices is read once
          seen[key] = read_slice(reader, src, tuple(index), t.transpose, dtype)
        return seen[key]

      families.set_path(out, t.path, jax.make_array_from_callback(
          tuple(want.shape), sharding, read))
      seen.clear()
  finally:
    reader.close()
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
    write_extras(tmp, cfg, base, tokenizer)


def write_extras(folder: str, cfg: transformer.ModelConfig, base: Mapping | None,
                  tokenizer: tokenizer_files.Tokenizer | None) -> None:
  """config.json, generation_config.json and the tokenizer files of a written folder."""
  config = hf_config(cfg, base, tokenizer)
  for name, obj in ((hf_reader.HF_CONFIG, config),
                    ("generation_config.json", _generation_config(config, tokenizer))):
    outputs.write_text(os.path.join(folder, name), json.dumps(obj, indent=1))
  tokenizer_files.write_files(tokenizer, folder)
