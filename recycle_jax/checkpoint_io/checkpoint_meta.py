"""A checkpoint's metadata: its abstract tree and the custom record recycle_jax keeps under
`META_KEY` (`{"recycle_jax": {"model": ModelConfig dict, ...}}`).
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
