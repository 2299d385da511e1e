"""Hugging Face folders read as `transformer.Transformer` parameters, for every family.

What differs between the layouts (names, kernel orientation, config fields) is each
family's mapping in `families.py`. Tensors go through the `safetensors` numpy API, so no
torch is needed, and pickled weights (.bin, .pt) are refused, never loaded. Everything is
checked from config.json and the safetensors headers before a tensor is read.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import numpy as np

from recycle_jax.models import families, transformer
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError, check

PyTree = Any
HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_RESAVE = ("re-save it as safetensors (save_pretrained(..., safe_serialization=True)) "
           "where you trust the file; recycle_jax never unpickles weights")


@dataclasses.dataclass(frozen=True)
class HFModel:
  """A Hugging Face folder as validated from config.json and the safetensors headers."""
  path: str
  family: families.Family
  cfg: transformer.ModelConfig
  hf_config: dict  # config.json as read
  files: dict[str, str]  # HF tensor name -> safetensors file holding it
  shapes: dict[str, tuple]  # HF tensor name -> shape


def is_hf_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, HF_CONFIG))


def _read_json(path: str, what: str) -> Any:
  return validation.load_json(path, what, "export the model with transformers' save_pretrained")


def _weight_files(src: str) -> list[str]:
  """The safetensors files of a folder; pickled weights are refused unread."""
  index = os.path.join(src, HF_INDEX)
  if os.path.isfile(index):
    doc = _read_json(index, HF_INDEX)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    check(isinstance(weight_map, dict) and weight_map, "index has no weight_map", index,
          "export the model with transformers' save_pretrained")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(src, HF_WEIGHTS)):
    files = [HF_WEIGHTS]
  else:
    pickled = sorted(os.path.basename(p) for pat in PICKLED
                     for p in glob.glob(os.path.join(src, pat)))
    check(not pickled, f"weights are pickled ({', '.join(pickled[:3])})", src, _RESAVE)
    raise UserError(f"no {HF_WEIGHTS} or {HF_INDEX}", src,
                    "convert a directory written by save_pretrained with safetensors")
  for f in files:
    check(isinstance(f, str) and f.endswith(".safetensors") and os.sep not in f,
          f"weights file {f!r} is not a safetensors file in the folder", src, _RESAVE)
    check(os.path.isfile(os.path.join(src, f)), f"weights file {f} not found", src,
          "copy every file the index lists, or re-export the model")
  return [os.path.join(src, f) for f in files]


def _headers(paths: list[str]) -> tuple[dict[str, str], dict[str, tuple]]:
  """(tensor -> file, tensor -> shape) from the safetensors headers; no tensor is read."""
  from safetensors import safe_open
  files, shapes = {}, {}
  for path in paths:
    validation.check_safetensors(path)  # offsets against the file: truncation, impostors
    try:
      with safe_open(path, framework="np") as f:
        for k in f.keys():
          check(k not in files, f"tensor {k!r} is in two files", path,
                "re-export the model")
          files[k], shapes[k] = path, tuple(f.get_slice(k).get_shape())
    except UserError:
      raise
    except Exception as e:  # safetensors raises its own error types for a bad header
      raise UserError(f"cannot read safetensors header: {e}", path,
                      "the file is truncated or not safetensors; re-export it") from None
  return files, shapes


def inspect_hf(src: str) -> HFModel:
  """Family, config and tensor layout of a Hugging Face folder, every check done."""
  path = os.path.join(src, HF_CONFIG)
  hf = _read_json(path, HF_CONFIG)
  validation.check_hf_config(hf, path)
  fam, cfg = families.from_hf_config(hf, f"config.json at {src}")
  files, shapes = _headers(_weight_files(src))
  families.check_tensors(cfg, shapes, src)
  return HFModel(src, fam, cfg, hf, files, shapes)


def load_hf(src: str) -> tuple[transformer.ModelConfig, PyTree, dict]:
  """(config, flax params, original config.json) from a Hugging Face folder."""
  from safetensors import safe_open
  m = inspect_hf(src)
  dtype = np.dtype(jax.numpy.dtype(m.cfg.dtype))
  params: dict = {}
  for t in families.tensor_map(m.cfg):
    with safe_open(m.files[t.hf_name], framework="np") as f:
      x = f.get_tensor(t.hf_name)
    families.set_path(params, t.path, np.ascontiguousarray(t.to_param(x).astype(dtype)))
  return m.cfg, params, m.hf_config
