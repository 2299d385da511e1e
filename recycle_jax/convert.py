"""`recycle-jax convert`: a Hugging Face folder into an Orbax checkpoint (`hf_reader`), or
an Orbax checkpoint into a Hugging Face folder (`hf_folder`), for every family.
"""
from __future__ import annotations

import os
from typing import Any


from recycle_jax.runtime import outputs
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.models import families
from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.runtime.errors import check
from recycle_jax.checkpoint_io.hf_reader import is_hf_folder, load_hf

PyTree = Any
HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


# ----------------------------------------------------------------------------- entry point

def convert(src: str, dst: str, overwrite: bool = False) -> str:
  """HF dir -> Orbax checkpoint, or Orbax checkpoint -> HF dir; returns the direction."""
  check(os.path.isdir(src), "source directory not found", src,
        "pass a Hugging Face model directory or an Orbax checkpoint")
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
  outputs.check_output(dst, [src], overwrite, flag="DST", nbytes=size)
  check(is_hf_folder(src) or not any(f.endswith(".safetensors") for f in os.listdir(src)),
        "a Hugging Face folder without config.json", src,
        "save the model with save_pretrained (it writes config.json)")
  if is_hf_folder(src):
    cfg, params, hf = load_hf(src)
    checkpoints.save(dst, params, {"model": cfg.to_dict(),
                                   "source": {"format": "huggingface",
                                              "path": os.path.abspath(src)},
                                   "hf_config": hf}, overwrite=overwrite,
                     tokenizer=tokenizer_files.from_folder(src, hf))  # the tokenizer travels
    return "huggingface -> orbax"
  meta = checkpoints.read_metadata(src)
  cfg = families.stored_config(meta.model_config, src)
  families.check_params(cfg, meta.abstract, src)
  params = checkpoints.restore(src, meta.abstract)
  from recycle_jax.checkpoint_io import hf_folder  # the one writer of Hugging Face folders (merges too)
  hf_folder.save_folder(dst, cfg, params, meta.custom.get(checkpoint_meta.META_KEY, {}).get(
      "hf_config"), tokenizer_files.of_checkpoint(src, meta.custom), overwrite)
  return "orbax -> huggingface"
