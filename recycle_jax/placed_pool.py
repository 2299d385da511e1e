"""A validated pool restored onto the mesh (`PlacedPool`, built by `place`), its base, and
the one path a merge of it is saved by (`save_merge`: a point of a merge space merged and
checked finite in one program, sharded like the pool, written with its metadata). The
search job and the `merge` command both start here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from recycle_jax.checkpoint_io import checkpoint_meta, checkpoints, pool_manifest
from recycle_jax.merging import kernels, spaces
from recycle_jax.models import partitioning
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError, check

if TYPE_CHECKING:
  from recycle_jax.models import transformer

PyTree = Any
FORMATS = ("orbax", "hf")  # how a merge is written: Orbax checkpoint, Hugging Face folder


@dataclasses.dataclass
class PlacedPool:
  """A validated pool restored onto the mesh, with the model that reads it."""
  pool: pool_manifest.Pool
  params: tuple  # N parameter trees, sharded by the partitioning rules
  model_cfg: transformer.ModelConfig
  mesh: Any
  tokenizer: Any = None  # the pool's tokenizer_files.Tokenizer; kept in merges
  source_config: dict | None = None  # the pool's Hugging Face config.json, if it has one

  @property
  def shardings(self) -> PyTree:
    """The parameters' placement: a merge lands sharded like the pool."""
    return partitioning.shardings_of(self.params[0])


def model_config_from(meta: checkpoint_meta.CheckpointMeta, where: str) -> transformer.ModelConfig:
  from recycle_jax.models import transformer  # noqa: PLC0415 (flax: only where a model is read)
  cfg = meta.model_config
  check(cfg is not None, "checkpoint has no model family (no recycle_jax model config in "
        "its metadata): it can be merged, not evaluated", where,
        "evaluate checkpoints converted by `recycle-jax convert` or written by recycle_jax")
  return validation.build(transformer.ModelConfig, cfg, where, "re-write this checkpoint")


def place(pool_spec, need_model: bool = True,
              meta: checkpoint_meta.CheckpointMeta | None = None) -> PlacedPool:
  """The pool restored onto the mesh. Without `need_model`, any trees of arrays (MaxText,
  t5x, ...) load, with `model_cfg` None when they record no model: merging needs none.
  pool_spec: a manifest path, entries, or a `Pool` already read (with its `meta`, already
  validated: neither is read again)."""
  from recycle_jax import configurables  # noqa: PLC0415 (the gin edge: make_mesh, ...)
  pool = pool_spec if isinstance(pool_spec, pool_manifest.Pool) else \
      pool_manifest.load_pool(pool_spec)
  meta = meta if meta is not None else checkpoints.validate_pool(pool)  # metadata only
  cfg = (model_config_from(meta, pool.entries[0].path)
         if need_model or meta.model_config is not None else None)
  mesh = configurables.make_mesh()
  shardings = configurables.param_shardings(meta.abstract, mesh)
  abstract = partitioning.with_shardings(meta.abstract, shardings)
  return PlacedPool(pool, checkpoints.restore_pool(pool, abstract), cfg, mesh, meta.tokenizer,
                meta.custom.get(checkpoint_meta.META_KEY, {}).get("hf_config"))


def nonfinite_members(loaded: PlacedPool) -> list[str]:
  """Names of pool members holding NaN/Inf (looked for once a merge came out non-finite)."""
  finite = jax.jit(kernels.all_finite)
  return [n for n, p in zip(loaded.pool.names, loaded.params) if not bool(finite(p))]


def load_base(path: str, loaded: PlacedPool) -> PyTree:
  """The base checkpoint, checked against the pool from metadata, placed like the pool."""
  entry = pool_manifest.Entry("<base>", os.path.abspath(path))
  checkpoints.validate_pool(pool_manifest.make_pool([entry, *loaded.pool.entries], path))
  abstract = partitioning.with_shardings(loaded.params[0], loaded.shardings)
  return checkpoints.restore(entry.path, abstract, "base")


def save_merge(loaded: PlacedPool, space: spaces.MergeSpace, point: np.ndarray,
               base: PyTree | None, path: str, method: str, how: dict, fmt: str,
               overwrite: bool) -> None:
  """The one merge path of `search` and `merge`: the point merged and checked finite in
  one program, sharded like the pool, saved with its metadata (`how` it was merged)."""
  w = np.asarray(point, np.float32)
  if space.is_linear:  # memory and compile time of the model's size, whatever N
    merged, finite = kernels.linear_accumulated(w, loaded.params)
  else:
    merged, finite = jax.jit(space.merge_checked, out_shardings=(
        loaded.shardings, partitioning.replicated(loaded.mesh)))(
            w, space.operands(loaded.params, base))
  if not bool(finite):  # found in the merge's own pass; only now look for the culprit
    bad = nonfinite_members(loaded)
    raise UserError(f"the merge has NaN or Inf values coming from {bad or 'the base'}",
                    "--pool", "repair or drop that checkpoint")
  save_merged(path, loaded, merged, merged_metadata(loaded, space.checkpoint_weights(w),
                                                    method, **how), fmt, overwrite)


def merged_metadata(loaded: PlacedPool, alphas: np.ndarray, method: str, **extra) -> dict:
  out = {"model": loaded.model_cfg.to_dict() if loaded.model_cfg else None,
         "merge": {"method": method, "weights": [float(a) for a in alphas],
                   "pool": loaded.pool.names, **extra}}
  if loaded.source_config:  # so an export to Hugging Face keeps the pool's values
    out["hf_config"] = loaded.source_config
  return out


def save_merged(path: str, loaded: PlacedPool, params: PyTree, custom: dict, fmt: str,
                overwrite: bool = False) -> None:
  """The merge as an Orbax checkpoint or (fmt 'hf') a Hugging Face folder, the pool's
  tokenizer kept with it either way."""
  if fmt == "hf":
    from recycle_jax.checkpoint_io import hf_folder  # noqa: PLC0415
    hf_folder.save_folder(path, loaded.model_cfg, params, loaded.source_config,
                      loaded.tokenizer, overwrite)
  else:
    checkpoints.save(path, params, custom, overwrite=overwrite, tokenizer=loaded.tokenizer)


# ----------------------------------------------------------------------------- the job

