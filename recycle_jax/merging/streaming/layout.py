"""Orbax's on-disk layout, as the streaming merge reads and writes it: zarr arrays in an
OCDBT database (or a file per chunk), the database's index of stored chunks, and the few
Orbax JSON files of a checkpoint."""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import time
from typing import Sequence

import tensorstore as ts

from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.merging.streaming.plan import Leaf


def read_json(ckpt_dir: str, name: str) -> dict | None:
  path = os.path.join(ckpt_dir, name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _param_name(entry: dict) -> str:
  return ".".join(str(k["key"]) for k in entry["key_metadata"])


def write_shapes(tree_meta: dict | None) -> dict[str, list[int]]:
  if not tree_meta:
    return {}
  return {_param_name(e): e.get("value_metadata", {}).get("write_shape")
          for e in tree_meta.get("tree_metadata", {}).values()}


def array_spec(ckpt_dir: str, name: str, tree_meta: dict | None = None) -> dict:
  """Tensorstore spec of one array as Orbax stores it (OCDBT + zarr unless told else)."""
  tree_meta = tree_meta or {}
  base = os.path.abspath(ckpt_dir)
  kv = ({**database_spec(base), "path": f"{name}/"}
        if tree_meta.get("use_ocdbt", True) else
        {"driver": "file", "path": os.path.join(base, name) + "/"})
  return {"driver": "zarr3" if tree_meta.get("use_zarr3", False) else "zarr", "kvstore": kv}


def database_spec(ckpt_dir: str) -> dict:
  """The kvstore spec of a checkpoint's OCDBT database (keys: `<array>/<chunk>`)."""
  return {"driver": "ocdbt", "base": f"file://{os.path.abspath(ckpt_dir)}/"}


def create_arrays(out_dir: str, leaves: Sequence[Leaf], chunks: dict[str, Sequence[int]],
                  ctx: ts.Context, compress: bool = False) -> dict[str, ts.TensorStore]:
  """Empty output arrays, created in one commit; returned outside any transaction."""
  txn = ts.Transaction()
  out = {leaf.name: ts.open(output_spec(out_dir, leaf, chunks[leaf.name], compress),
                            create=True, dtype=ts.dtype(leaf.dtype.name), shape=leaf.shape,
                            transaction=txn, context=ctx).result() for leaf in leaves}
  txn.commit_sync()
  return {k: v.with_transaction(None) for k, v in out.items()}


def output_spec(out_dir: str, leaf: Leaf, chunks: Sequence[int], compress: bool = False) -> dict:
  """A zarr array in Orbax's layout, every chunk stored; zstd only if `compress` (float
  weights shrink by ~8% and encoding costs more than the rest of the merge together)."""
  spec = array_spec(out_dir, leaf.name)
  spec["metadata"] = {"chunks": [max(1, c) for c in chunks] or [1],
                      "compressor": {"id": "zstd", "level": 1} if compress else None}
  if not leaf.shape:
    spec["metadata"].pop("chunks")
  spec["store_data_equal_to_fill_value"] = True
  return spec


def ocdbt_index(ckpt_dir: str, ctx: ts.Context) -> dict[bytes, tuple] | None:
  """Where each key of a checkpoint's OCDBT database lies: `(file, offset, length)` for a
  value in a data file, `(None, bytes)` for one stored in the tree. From the database's
  own dump (`tensorstore.ocdbt.dump`); None where that is not possible (no OCDBT, a layout
  this does not know), and the caller reads through tensorstore instead."""
  try:
    base = ts.KvStore.open(f"file://{os.path.abspath(ckpt_dir)}/", context=ctx).result()
    manifest = ts.ocdbt.dump(base, context=ctx).result()
    if not manifest.get("versions"):
      return None
    root = manifest["versions"][-1].get("root", {}).get("location")
    index: dict[bytes, tuple] = {}
    if not root:
      return index
    stack = [(root, b"")]
    while stack:
      location, prefix = stack.pop()
      node = ts.ocdbt.dump(base, location, context=ctx).result()
      for e in node["entries"]:
        if "location" in e:  # an interior node: keys below it are relative to it
          stack.append((e["location"], prefix + e.get("subtree_common_prefix", b"")))
        elif "inline_value" in e:
          index[prefix + e["key"]] = (None, e["inline_value"])
        else:
          kind, rest = e["indirect_value"].split(":", 1)
          file_id, offset, length = rest.rsplit(":", 2)
          if kind != "value" or "%" in file_id:
            return None
          index[prefix + e["key"]] = (os.path.join(ckpt_dir, file_id.replace(":", "", 1)),
                                      int(offset), int(length))
    return index
  except Exception:  # noqa: BLE001 - any surprise: tensorstore reads it the slow, sure way
    return None


def files_index(ckpt_dir: str) -> dict[bytes, tuple]:
  """`ocdbt_index` for Orbax's other layout (`use_ocdbt=False`: a directory per array,
  a file per chunk): each file is a key, its bytes the value; `.zarray` files are read."""
  index: dict[bytes, tuple] = {}
  top = os.path.abspath(ckpt_dir)
  for root, _, files in os.walk(top):
    for name in files:
      path = os.path.join(root, name)
      key = os.path.relpath(path, top).replace(os.sep, "/").encode()
      if name == ".zarray":
        with open(path, "rb") as f:
          index[key] = (None, f.read())
      else:
        index[key] = (path, 0, os.path.getsize(path))
  return index


def chunk_index(ckpt_dir: str, tree_meta: dict | None, ctx: ts.Context) -> dict | None:
  """Where each stored key of a checkpoint lies, in either of Orbax's layouts."""
  if (tree_meta or {}).get("use_ocdbt", True):
    return ocdbt_index(ckpt_dir, ctx)
  return files_index(ckpt_dir)


def chunk_key(name: str, index: Sequence[int], sep: str = ".") -> str:
  """A zarr v2 chunk's key in its checkpoint: `<array>/<i>.<j>...` (Orbax's separator)."""
  return f"{name}/{sep.join(map(str, index))}"


def raw_chunks(index: dict[bytes, tuple] | None, leaf: Leaf) -> tuple[dict, str] | None:
  """`(chunk key -> location, dimension separator)` when every stored chunk of the leaf
  can be used as bytes as they are: zarr v2, uncompressed, no filters, C order, the
  leaf's dtype, the plan's chunk shape, no chunk left out. Else None."""
  if index is None or not leaf.shape or not all(leaf.shape):
    return None
  meta = index.get(f"{leaf.name}/.zarray".encode())
  if meta is None or meta[0] is not None:
    return None
  try:
    z = json.loads(meta[1])
  except ValueError:
    return None
  dtype = "bfloat16" if leaf.dtype.name == "bfloat16" else leaf.dtype.str
  if (z.get("zarr_format") != 2 or z.get("compressor") is not None or z.get("filters")
      or z.get("order") != "C" or z.get("dtype") != dtype or dtype[0] == ">"
      or list(z.get("chunks", [])) != list(leaf.write_shape)
      or list(z.get("shape", [])) != list(leaf.shape)):
    return None
  sep = z.get("dimension_separator", ".")
  grid = [range(-(-n // c)) for n, c in zip(leaf.shape, leaf.write_shape)]
  nbytes = math.prod(leaf.write_shape) * leaf.dtype.itemsize
  locs = {}
  for k in itertools.product(*grid):
    loc = index.get(chunk_key(leaf.name, k, sep).encode())
    if loc is None or (len(loc[1]) if loc[0] is None else loc[2]) != nbytes:
      return None  # missing, or not a whole chunk: tensorstore reads (and reports) it
    locs[k] = loc
  return locs, sep


@functools.lru_cache(maxsize=1 << 12)  # the same for every input chunked alike
def pieces(leaf: Leaf, ushape: tuple[int, ...], origin: tuple[int, ...]) -> list[tuple]:
  """Where a unit's stored bytes lie: `(chunk index, byte offset in the chunk, bytes,
  element offset in the unit)`, one per stored chunk the unit crosses (see unit_shape)."""
  chunk, item = leaf.write_shape, leaf.dtype.itemsize
  d = next((i for i, u in enumerate(ushape) if u != 1), len(ushape) - 1)  # the cut axis
  inner = math.prod(chunk[d + 1:])
  stride = [math.prod(chunk[j + 1:]) for j in range(len(chunk))]
  key = [o // c for o, c in zip(origin, chunk)]
  within = sum((o % c) * s for o, c, s in zip(origin[:d], chunk[:d], stride[:d]))
  out = []
  start, stop = origin[d], min(origin[d] + ushape[d], leaf.shape[d])
  while start < stop:
    k, r = divmod(start, chunk[d])
    n = min(chunk[d] - r, stop - start)
    key[d] = k
    out.append((tuple(key), (within + r * stride[d]) * item, n * inner * item,
                (start - origin[d]) * inner))
    start += n
  return out


def orbax_json(tree_meta: dict, ckpt_meta: dict | None, custom: dict,
               chunks: dict[str, list[int]]) -> dict[str, dict]:
  """`_METADATA` and `_CHECKPOINT_METADATA` of the merged checkpoint: the first input's
  tree (same structure, shapes, dtypes), with our chunking, storage format and metadata."""
  tree = json.loads(json.dumps(tree_meta))
  tree.update(use_ocdbt=True, use_zarr3=False, custom_metadata=None)
  for entry in tree.get("tree_metadata", {}).values():
    vm = entry.setdefault("value_metadata", {})
    if vm.get("write_shape"):
      vm["write_shape"] = chunks[_param_name(entry)]
  now = time.time_ns()
  ckpt = {**(ckpt_meta or {}), "metrics": {}, "performance_metrics": {},
          "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
          "custom_metadata": {checkpoint_meta.META_KEY: custom}}
  return {"_METADATA": tree, "_CHECKPOINT_METADATA": ckpt}


def write_orbax_files(out_dir: str, src: str, tree_meta: dict, custom: dict,
                      chunks: dict[str, Sequence[int]]) -> None:
  files = orbax_json(tree_meta, read_json(src, "_CHECKPOINT_METADATA"), custom, chunks)
  for name, data in files.items():
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(data, f)
  if os.path.isfile(os.path.join(src, "_sharding")):  # default placement when restored
    shutil.copy(os.path.join(src, "_sharding"), os.path.join(out_dir, "_sharding"))
