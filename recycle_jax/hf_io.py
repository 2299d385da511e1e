"""Hugging Face folders as pool members, read in place, and merges written as such folders.

Reading: a folder (config.json + model.safetensors, or shards listed by
model.safetensors.index.json) is validated from config.json and the safetensors headers
alone (the 8-byte header length, the JSON header; every tensor's name, shape, dtype and
byte range checked against the family's mapping and the file's size), then restored
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
import struct
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from recycle_jax import checkpoints, convert, families, models, vocabularies
from recycle_jax.errors import UserError, check

PyTree = Any
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
ST_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
SHARD_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where one tensor's bytes are: file, absolute byte offset, dtype, shape."""
  file: str
  offset: int
  dtype: np.dtype
  shape: tuple[int, ...]

  def memmap(self) -> np.ndarray:
    if not self.shape or 0 in self.shape:
      return np.zeros(self.shape, self.dtype)
    return np.memmap(self.file, self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_header(path: str) -> dict[str, Tensor]:
  """{name: Tensor} of one safetensors file from its header alone (no tensor read); a
  header or byte range that does not fit the file is refused, naming the file."""
  fix = "the file is truncated or not safetensors; copy or export it again"
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      check(len(head) == 8, "safetensors file is shorter than its 8-byte header length",
            path, fix)
      (n,) = struct.unpack("<Q", head)
      check(0 < n <= min(MAX_HEADER, size - 8), f"safetensors header length {n} does not "
            f"fit the file ({size} bytes)", path, fix)
      raw = f.read(n)
    header = json.loads(raw)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read safetensors header: {type(e).__name__}: {e}", path,
                    fix) from None
  check(isinstance(header, dict), "safetensors header is not a JSON object", path, fix)
  data, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and \
        isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
    check(ok, f"tensor {name!r} has a malformed header entry", path, fix)
    dtype = DTYPES.get(info.get("dtype"))
    check(dtype is not None, f"tensor {name!r} has dtype {info.get('dtype')!r}, not a "
          f"float type ({', '.join(DTYPES)})", path, "model weights must be floating point")
    shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
    check(all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
          and isinstance(end, int) and 0 <= begin <= end,
          f"tensor {name!r} has a malformed shape or byte range", path, fix)
    check(end - begin == int(np.prod(shape)) * dtype.itemsize,
          f"tensor {name!r}: byte range {end - begin} != shape {shape} x {dtype.itemsize}",
          path, fix)
    check(data + end <= size, f"tensor {name!r} ends at byte {data + end} but the file has "
          f"{size} (truncated?)", path, fix)
    out[name] = Tensor(path, data + begin, dtype, shape)
  return out


@dataclasses.dataclass(frozen=True)
class Folder:
  """A Hugging Face folder validated from config.json and its safetensors headers."""
  model: convert.HFModel  # family, ModelConfig, config.json, tensor -> file and shape
  tensors: dict[str, Tensor]

  @property
  def cfg(self) -> models.ModelConfig:
    return self.model.cfg


def is_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, convert.HF_CONFIG))


def open_folder(path: str, name: str | None = None) -> Folder:
  where = f"checkpoint {name!r} at {path}" if name else path
  check(os.path.isdir(path), "checkpoint directory not found", where,
        "check the path in the pool manifest")
  model = convert.inspect_hf(os.path.abspath(path))  # family, config, names and shapes
  tensors = {}
  for file in sorted(set(model.files.values())):
    tensors.update({k: v for k, v in read_header(file).items() if k in model.files
                    and model.files[k] == file})
  return Folder(model, tensors)


def read_metadata(path: str, name: str | None = None) -> checkpoints.CheckpointMeta:
  """The folder as checkpoint metadata: the params tree's shapes (model dtype) and the
  model config, as a converted checkpoint records them. No tensor is read."""
  f = open_folder(path, name)
  custom = {checkpoints.META_KEY: {
      "model": f.cfg.to_dict(), "hf_config": f.model.hf_config,
      "source": {"format": "huggingface", "path": os.path.abspath(path)}}}
  return checkpoints.CheckpointMeta(families.param_shapes(f.cfg), custom)


def restore(path: str, abstract: PyTree, name: str | None = None) -> PyTree:
  """The params of the folder at `path`, each placed by the sharding in `abstract` (one
  device when it has none), reading only each device's slices from the mapped files."""
  f = open_folder(path, name)
  out: dict = {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for t in families.tensor_map(f.cfg):
    want = families.get_path(abstract, t.path)
    sharding = getattr(want, "sharding", None) or default
    src, dtype = f.tensors[t.hf_name], np.dtype(want.dtype)

    def read(index, src=src, t=t, dtype=dtype):
      mm = src.memmap()  # per call: the mapping is dropped with the slice's copy
      part = mm[tuple(index)[::-1]].T if t.transpose else mm[tuple(index)]
      return np.ascontiguousarray(part, dtype=dtype)

    families.set_path(out, t.path, jax.make_array_from_callback(
        tuple(want.shape), sharding, read))
  return out


# ----------------------------------------------------------------------------- writing

def _generation_config(config: Mapping, vocab) -> dict:
  ids = {k: config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
  if vocab is not None and hasattr(vocab, "eos_id"):
    ids["eos"] = ids["eos"] if ids["eos"] is not None else vocab.eos_id
    ids["bos"] = ids["bos"] if ids["bos"] is not None else getattr(vocab, "bos_id", None)
    ids["pad"] = ids["pad"] if ids["pad"] is not None else vocab.pad_id
  return {f"{k}_token_id": v for k, v in ids.items() if v is not None}


def hf_config(cfg: models.ModelConfig, base: Mapping | None, vocab) -> dict:
  """config.json of a merge: the family's mapping of `cfg` over the pool's source config
  (`base`: token ids), the ids the tokenizer knows filling those it lacks."""
  out = families.to_hf_config(cfg, dict(base or {}))
  gen = _generation_config(out, vocab)
  out.update({k: v for k, v in gen.items() if out.get(k) is None})
  return out


def save_folder(path: str, cfg: models.ModelConfig, params: PyTree,
                base: Mapping | None = None, vocab=None, overwrite: bool = False,
                shard_bytes: int = SHARD_BYTES) -> None:
  """Writes `params` as a complete Hugging Face folder at `path` (see the module
  docstring), through a temporary sibling renamed into place when complete."""
  from safetensors.numpy import save_file
  check(cfg.family in families.REGISTRY, f"model family {cfg.family!r} has no Hugging Face "
        "layout", "--format=hf", "write Orbax (drop --format=hf)")
  path = os.path.abspath(path)
  tmp = checkpoints.temp_sibling(path)
  os.makedirs(tmp)
  groups, size = [[]], 0
  for t in families.tensor_map(cfg):
    leaf = families.get_path(params, t.path)
    n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if groups[-1] and size + n > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(t)
    size += n
  weight_map, total = {}, 0
  for i, group in enumerate(groups):
    name = (convert.HF_WEIGHTS if len(groups) == 1 else
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
    tensors = {t.hf_name: np.ascontiguousarray(t.to_hf(np.asarray(jax.device_get(
        families.get_path(params, t.path))))) for t in group}
    save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    total += sum(x.nbytes for x in tensors.values())
  write = lambda name, obj: checkpoints.atomic_write_text(  # noqa: E731
      os.path.join(tmp, name), json.dumps(obj, indent=1))
  write(convert.HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
  config = hf_config(cfg, base, vocab)
  write(convert.HF_CONFIG, config)
  write("generation_config.json", _generation_config(config, vocab))
  vocabularies.write_files(vocab, tmp)
  checkpoints.commit(tmp, path, overwrite)
