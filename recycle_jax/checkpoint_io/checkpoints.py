"""Checkpoints of either format: metadata-only validation of a pool against its first
member, and reads and writes that choose Orbax or a Hugging Face folder (`hf_folder`).
Inputs are only ever read; an Orbax save goes to a fresh sibling directory renamed into
place (`runtime.outputs`), so a crash never leaves a partial checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np

from recycle_jax.runtime import outputs, quiet, validation, waits
from recycle_jax.checkpoint_io import tokenizer_files, training_run
from recycle_jax.runtime.errors import UserError, check
from recycle_jax.models.partitioning import path_str, with_shardings
from recycle_jax.checkpoint_io.hf_reader import is_hf_folder
from recycle_jax.checkpoint_io.checkpoint_meta import META_KEY, CheckpointMeta
from recycle_jax.checkpoint_io.pool_manifest import Pool

PyTree = Any




def read_metadata(path: str, name: str | None = None,
                  subtree: tuple[str, ...] = ()) -> CheckpointMeta:
  """Shapes, dtypes and custom metadata, reading no array data. subtree: the parameters'
  place in a train state (a training run's step: `training_run`); an item of a
  CheckpointManager step takes the step's custom metadata."""
  where = f"checkpoint {name!r} at {path}" if name else path
  path = os.path.abspath(path)  # Orbax's OCDBT reader needs absolute paths
  check(os.path.isdir(path), "checkpoint directory not found", where,
        "check the path in the pool manifest or --checkpoint")
  if is_hf_folder(path):  # a Hugging Face folder, read in place
    from recycle_jax.checkpoint_io import hf_folder
    return hf_folder.read_metadata(path, name)
  check(bool(os.listdir(path)), "checkpoint directory is empty", where,
        "point at a directory written by Orbax")
  check(os.path.exists(os.path.join(path, "_METADATA")),
        "not a checkpoint: no _METADATA (Orbax) and no config.json (Hugging Face)", where,
        "point at a checkpoint directory written by Orbax or a Hugging Face model folder")
  check_metadata_file(path, where)
  try:
    import orbax.checkpoint as ocp  # here, not at import: `merge --config` and errors skip it
    with quiet.abandoned_reads():  # (it reads the arrays' metadata from the data files)
      meta = waits.call(lambda: ocp.StandardCheckpointer().metadata(path),
                        "reading the checkpoint's metadata", where)
    tree = meta.item_metadata
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
                            dict(tree))
  except UserError:  # (a read past the bound)
    raise
  except Exception as e:  # Orbax raises many types for unreadable metadata
    raise UserError(f"checkpoint metadata is unreadable (corrupted or truncated?): "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                    where, "re-write or remove this checkpoint") from None
  abstract = training_run.subtree(abstract, subtree, where)
  check(len(jax.tree.leaves(abstract)) > 0, "checkpoint holds no arrays", where)
  return CheckpointMeta(abstract, dict(meta.custom_metadata or {}) or
                        training_run.step_custom(path))


def check_metadata_file(path: str, where: str) -> None:
  """Orbax's _CHECKPOINT_METADATA (custom metadata: the model config), when present, must be
  a JSON object: Orbax reads a damaged one as "no metadata" and carries on."""
  f = os.path.join(path, "_CHECKPOINT_METADATA")
  if os.path.exists(f):
    doc = validation.load_json(f, f"checkpoint metadata of {where}",
                               "re-write or remove this checkpoint")
    check(isinstance(doc, dict), "checkpoint metadata is not a JSON object", f,
          "re-write or remove this checkpoint")


def _describe(abstract: PyTree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {path_str(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in flat}


def _config_diff(ref: dict | None, cur: dict | None) -> list[str]:
  """'key cur vs ref' for model-config fields both record with different values."""
  both = sorted(set(ref or {}) & set(cur or {}))
  return [f"{k} {cur[k]!r} vs {ref[k]!r}" for k in both if cur[k] != ref[k]]


def validate_pool(pool: Pool) -> CheckpointMeta:
  """Checks every checkpoint against the first from metadata alone (and their tokenizers
  against each other); returns the first's, with the pool's tokenizer."""
  metas = [read_metadata(e.path, e.name, e.subtree) for e in pool.entries]
  ref, ref_name = _describe(metas[0].abstract), pool.entries[0].name
  family = lambda m: (m.model_config or {}).get("family", "byte")  # noqa: E731
  for e, m in zip(pool.entries[1:], metas[1:]):
    cur = _describe(m.abstract)
    where = f"checkpoint {e.name!r} at {e.path}"
    check(m.model_config is None or metas[0].model_config is None or
          family(m) == family(metas[0]), f"checkpoint {e.name!r} is a {family(m)} model but "
          f"{ref_name!r} is a {family(metas[0])} model", pool.source,
          "a pool holds fine-tunes of one model family")
    # Named config fields (e.g. vocab_size) say more than the first mismatching tensor.
    diff = _config_diff(metas[0].model_config, m.model_config)
    check(not diff, f"model config differs from {ref_name!r}: {', '.join(diff)}", where,
          "every pool member must share one architecture and vocabulary")
    for key in sorted(set(ref) | set(cur)):
      check(key in cur, f"parameter {key!r} of {ref_name!r} is missing", where,
            "every pool member must share one model architecture")
      check(key in ref, f"parameter {key!r} is not in {ref_name!r}", where,
            "every pool member must share one model architecture")
      check(cur[key][0] == ref[key][0],
            f"parameter {key!r} has shape {cur[key][0]} but {ref_name!r} has {ref[key][0]}",
            where, "vocabularies and widths must match across the pool")
      check(cur[key][1] == ref[key][1],
            f"parameter {key!r} has dtype {cur[key][1]} but {ref_name!r} has {ref[key][1]}",
            where, "convert the pool to one dtype first")
    check((m.model_config is None) == (metas[0].model_config is None),
          f"{'no' if m.model_config is None else 'a'} recycle_jax model config in its metadata, "
          f"unlike {ref_name!r}", where, "every pool member must be written the same way "
          "(a damaged _CHECKPOINT_METADATA?)")
  toks = [tokenizer_files.of_checkpoint(e.path, m.custom) for e, m in zip(pool.entries, metas)]
  tokenizer_files.check_pool(pool.names, toks,
                             [(m.model_config or {}).get("vocab_size") for m in metas],
                             pool.source)
  return dataclasses.replace(metas[0], tokenizer=toks[0])


# ----------------------------------------------------------------------------- I/O

def restore(path: str, abstract: PyTree, name: str | None = None,
            subtree: tuple[str, ...] = ()) -> PyTree:
  """Restores arrays, placed by the shardings in `abstract` when it has them (a read
  that hangs ends at the bound: waits). subtree: read only the parameters of a train
  state (an Orbax partial restore: the optimizer state is never read)."""
  where = f"checkpoint {name!r} at {path}" if name else path
  if is_hf_folder(path):  # each device's slices read from the mapped safetensors files
    from recycle_jax.checkpoint_io import hf_folder
    return waits.call(lambda: hf_folder.restore(path, abstract, name), "reading the checkpoint",
                      where)
  try:
    import orbax.checkpoint as ocp
    with quiet.abandoned_reads():
      if subtree:
        return waits.call(lambda: _restore_subtree(os.path.abspath(path), abstract, subtree),
                          "reading the checkpoint", where)
      return waits.call(lambda: ocp.StandardCheckpointer().restore(os.path.abspath(path),
                                                                   abstract),
                        "reading the checkpoint", where)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f"checkpoint data is unreadable (corrupted or truncated?): "
                    f"{_read_error(e)}", where, "re-write or remove this checkpoint") from None


def restore_local(path: str, name: str | None = None) -> tuple[dict, CheckpointMeta]:
  """(numpy arrays, metadata) on this host, wherever and however the checkpoint was sharded
  when written (e.g. by several processes): for comparing and inspecting, not for runs."""
  meta = read_metadata(path, name)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = with_shardings(meta.abstract, jax.tree.map(lambda _: dev, meta.abstract))
  return jax.tree.map(np.asarray, restore(path, abstract, name)), meta


def _restore_subtree(path: str, abstract: PyTree, subtree: tuple[str, ...]) -> PyTree:
  """abstract's arrays from tree[subtree[0]][...] of the checkpoint at path, alone."""
  import orbax.checkpoint as ocp
  item = abstract
  for k in reversed(subtree):
    item = {k: item}
  out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  for k in subtree:
    out = out[k]
  return out


def _read_error(e: Exception) -> str:
  """Which parameter failed, from the TensorStore spec Orbax puts in its message."""
  msg = str(e)
  param = re.search(r"'path': '([^'/]+)/'", msg)  # the array's key inside the checkpoint
  if param:
    return f"cannot read parameter {param.group(1).replace('.', '/')!r}"
  return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def restore_pool(pool: Pool, abstract: PyTree) -> tuple[PyTree, ...]:
  return tuple(restore(e.path, abstract, e.name, e.subtree) for e in pool.entries)


def save(path: str, params: PyTree, custom: dict, overwrite: bool = False,
         tokenizer: tokenizer_files.Tokenizer | None = None) -> None:
  """Writes an Orbax checkpoint atomically: a sibling temp dir renamed into place. The
  tokenizer is kept with it: its files in `tokenizer/`, its kind and content hash in the
  metadata (`tokenizer_files.of_checkpoint` reads them back)."""
  import orbax.checkpoint as ocp
  if tokenizer is not None:
    custom = {**custom, "vocabulary": tokenizer.describe()}  # the key existing checkpoints use
  with outputs.writing(path, overwrite, reads_back(params)) as tmp:
    ckptr = ocp.StandardCheckpointer()
    quiet.failed_writes()
    try:
      ckptr.save(tmp, params, custom_metadata={META_KEY: custom})
      waits.call(ckptr.wait_until_finished, "writing the checkpoint", tmp)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise their own types)
      raise UserError(f"cannot write the checkpoint: {_write_error(e)}", path,
                      "free some space (or inodes) there, or write elsewhere") from None
    if jax.process_index() == 0:
      tokenizer_files.write_files(tokenizer, os.path.join(tmp, tokenizer_files.TOKENIZER_DIR))


def _write_error(e: Exception) -> str:
  """What failed in a write, in a few words (TensorStore's message spans lines and paths)."""
  msg = str(e)
  for text, what in (("No space left", "no space or inodes left on its filesystem"),
                     ("Read-only file system", "its filesystem is read-only"),
                     ("Permission denied", "permission denied")):
    if text in msg:
      return what
  return f"{type(e).__name__}: {' '.join(msg.split())[:160]}"


def reads_back(params: PyTree):
  """A check that a written Orbax checkpoint is complete: its metadata reads back with
  every array of `params`, of its shape (a success is reported only after it)."""
  want = {k: tuple(v) for k, v in _describe(params).items()}

  def verify(path: str) -> None:
    import orbax.checkpoint as ocp
    try:
      tree = waits.call(lambda: ocp.StandardCheckpointer().metadata(path),
                        "reading back the written checkpoint", path).item_metadata
      got = {k: tuple(v) for k, v in _describe(jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), dict(tree))).items()}
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 (Orbax raises many types)
      got = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    why = got if isinstance(got, str) else "its arrays differ"
    check(got == want, f"the written checkpoint does not read back whole ({why})", path,
          "rerun the command (was the disk full, or did something else write there?)")
  return verify
