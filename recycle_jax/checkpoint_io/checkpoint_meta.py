"""Pools of Orbax checkpoints: the manifest, metadata-only validation, and Orbax I/O.

A checkpoint is an Orbax PyTree directory of model parameters whose custom metadata holds
`{"recycle_jax": {"model": ModelConfig dict, ...}}`. Inputs are only ever read; writes
go to a fresh sibling directory that is renamed into place, so a crash never leaves a
partial checkpoint at the destination.
"""
from __future__ import annotations

import dataclasses
from typing import Any



PyTree = Any
META_KEY = "recycle_jax"


# ----------------------------------------------------------------------------- metadata

@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  abstract: PyTree  # ShapeDtypeStructs, no shardings
  custom: dict
  tokenizer: Any = None  # tokenizer_files.Tokenizer of the pool (validate_pool)

  @property
  def model_config(self) -> dict | None:
    return self.custom.get(META_KEY, {}).get("model")
