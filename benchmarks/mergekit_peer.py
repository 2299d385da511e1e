"""recycle_jax against mergekit on the same Hugging Face folders, whole processes.

  speed   (default) N Llama folders built locally with transformers (random weights), merged
          linearly by `mergekit-yaml` and by `recycle-jax merge --config` from one mergekit
          YAML, in interleaved rounds: each tool's wall time and peak RSS (wait4 of the
          process), the ratio, and the largest difference of the outputs; beside them
          recycle_jax's start-up alone (`merge --help`) and a raw read of the same input
          bytes plus a write and fsync of one output, in this process.
  parity  every method both tools have, on small float32 folders: the largest difference
          (deterministic methods), or for the random ones (DARE, DELLA) the kept fraction
          and the L1 ratio of the task vector, side by side.

Nothing is installed at run time: mergekit is used when `MERGEKIT_VENV/bin/mergekit-yaml`
exists (--mergekit_venv, or the MERGEKIT_VENV environment variable; e.g. a venv with
`pip install mergekit==0.1.5`); without it only recycle_jax runs. Building the models
needs torch and transformers (requirements-test.txt).

  python benchmarks/mergekit_peer.py --workdir=/tmp/peer                  # ~2-3 minutes
  python benchmarks/mergekit_peer.py --workdir=/tmp/peer --hidden=768 --layers=12 \\
      --vocab=32000 --rounds=3                                            # 8 x 134M bf16
  python benchmarks/mergekit_peer.py --workdir=/tmp/peer100 --size=100 --rounds=2 \
      --compare=/tmp/old_checkout        # 8 x ~111 MB; also an older recycle_jax and a
                                         # raw read+write of the same bytes
  python benchmarks/mergekit_peer.py --workdir=/tmp/peer_parity --mode=parity
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- models

def build_models(workdir: str, n: int, hidden: int, layers: int, vocab: int, dtype: str,
                 with_base: bool) -> list[str]:
  """base (optional) and n fine-tunes (base + small noise), cached in workdir."""
  names = (["base"] if with_base else []) + [f"m{i}" for i in range(n)]
  stamp = os.path.join(workdir, "models.json")
  spec = dict(n=n, hidden=hidden, layers=layers, vocab=vocab, dtype=dtype, base=with_base)
  if os.path.isfile(stamp) and json.load(open(stamp)) == spec:
    return [os.path.join(workdir, x) for x in names]
  import torch
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
      num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False)
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
  state = {k: v.clone() for k, v in base.state_dict().items()}
  for name in names:
    if name != "base":
      with torch.no_grad():
        for k, v in base.state_dict().items():
          v.copy_(state[k].float() + 0.02 * torch.randn(v.shape))
    base.save_pretrained(os.path.join(workdir, name))
  with open(stamp, "w") as f:
    json.dump(spec, f)
  return [os.path.join(workdir, x) for x in names]


# ----------------------------------------------------------------------------- running

def run(cmd: list[str], env: dict | None = None, cwd: str | None = None
        ) -> tuple[float, float]:
  """(wall seconds, peak RSS MiB) of one whole process; raises with its output on failure.
  `cwd` outside a checkout: `python -m` puts the working directory before PYTHONPATH."""
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env={**os.environ, **(env or {})}, cwd=cwd)
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{cmd[0]} failed:\n{out.decode(errors='replace')[-3000:]}")
  return wall, usage.ru_maxrss / 1024


def mergekit_cmd(venv: str | None):
  exe = venv and os.path.join(venv, "bin", "mergekit-yaml")
  if not exe or not os.path.isfile(exe):
    return None
  return lambda cfg, out: [exe, "--no-write-model-card", "--no-copy-tokenizer", cfg, out]


def recycle_cmd(cfg: str, out: str) -> list[str]:
  return [sys.executable, "-m", "recycle_jax.cli", "merge", f"--config={cfg}",
          f"--output={out}", "--log_level=warning"]


RJ_ENV = {"PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
MK_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def load_folder(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a folder as float64 (safetensors' numpy API has no bfloat16)."""
  sys.path.insert(0, ROOT)
  from recycle_jax.checkpoint_io import safetensors_io
  reader = safetensors_io.Reader()
  try:
    return {k: reader.read(info).astype(np.float64)
            for k, info in safetensors_io.folder_tensors(path).items()}
  finally:
    reader.close()


def max_diff(a: dict, b: dict) -> float:
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def write_yaml(path: str, cfg: dict) -> str:
  import yaml
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
  return path


# ----------------------------------------------------------------------------- speed

# --size presets (hidden, layers, vocab): Llama folders of about that many MB in bfloat16.
SIZES = {"100": (512, 8, 32000), "270": (768, 12, 32000)}
RAW = "raw read+write"
STARTUP = "recycle_jax start-up"


def raw_io(files: list[str], out_bytes: int, out: str) -> None:
  """What the merge cannot avoid: read every input byte (8 MiB reads) and write and fsync
  one output's worth, in this process."""
  buf = bytearray(8 << 20)
  for path in files:
    with open(path, "rb", buffering=0) as f:
      while f.readinto(buf):
        pass
  chunk = bytes(8 << 20)
  with open(out, "wb") as f:
    for s in range(0, out_bytes, len(chunk)):
      f.write(chunk[:min(len(chunk), out_bytes - s)])
    f.flush()
    os.fsync(f.fileno())


def speed(args, mk) -> None:
  models = build_models(args.workdir, args.models, args.hidden, args.layers, args.vocab,
                        args.dtype, with_base=False)
  files = [f for m in models for f in glob.glob(f"{m}/*.safetensors")]
  size = sum(os.path.getsize(f) for f in files)
  print(f"{len(models)} models, {size / 2**20:.0f} MiB of {args.dtype} safetensors")
  cfg = write_yaml(os.path.join(args.workdir, "linear.yml"), {
      "merge_method": "linear", "dtype": args.dtype,
      "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]})
  tools = {"recycle_jax": (lambda c, o: recycle_cmd(c, o), RJ_ENV),
           # its start-up alone: the imports and the argument parser (`merge --help`)
           STARTUP: (lambda c, o: [sys.executable, "-m", "recycle_jax.cli", "merge", "--help"],
                     RJ_ENV)}
  if args.compare:  # another checkout of recycle_jax (e.g. an older commit)
    tools["recycle_jax@compare"] = (lambda c, o: recycle_cmd(c, o),
                                    {**RJ_ENV, "PYTHONPATH": args.compare})
  if mk:
    tools["mergekit"] = (mk, MK_ENV)
  tools[RAW] = (None, None)
  times = {t: [] for t in tools}
  for r in range(args.rounds):
    for name, (cmd, env) in (tools.items() if r % 2 == 0 else reversed(tools.items())):
      out = os.path.join(args.workdir, f"out_{name.replace(' ', '_').replace('-', '_')}")
      shutil.rmtree(out, ignore_errors=True)
      subprocess.run(["sync"])
      if cmd is None:
        t0 = time.perf_counter()
        raw_io(files, size // len(models), out)
        wall, rss = time.perf_counter() - t0, 0.0
        os.remove(out)
      else:
        wall, rss = run(cmd(cfg, out), env, cwd=args.workdir)
      times[name].append((wall, rss))
      print(f"round {r}: {name:12s} {wall:7.2f} s  {rss:7.0f} MiB peak RSS", flush=True)
  print()
  for name, ts in times.items():
    w = [t for t, _ in ts]
    print(f"{name:12s} wall median {np.median(w):6.2f} s (range {min(w):.2f}-{max(w):.2f}), "
          f"peak RSS max {max(r for _, r in ts):.0f} MiB")
  med = {name: float(np.median([t for t, _ in ts])) for name, ts in times.items()}
  print(f"rate of recycle_jax's whole process / raw read+write of the same bytes: "
        f"{med[RAW] / med['recycle_jax']:.3f} (goal >= 0.5); without its start-up "
        f"(whole process minus the start-up's median): "
        f"{med[RAW] / max(med['recycle_jax'] - med[STARTUP], 1e-9):.3f}")
  if args.compare:
    print(f"recycle_jax / recycle_jax@compare wall: "
          f"{med['recycle_jax'] / med['recycle_jax@compare']:.3f}")
  if mk:
    rj, m = np.median([t for t, _ in times["recycle_jax"]]), np.median(
        [t for t, _ in times["mergekit"]])
    rss = max(r for _, r in times["recycle_jax"]) / max(r for _, r in times["mergekit"])
    d = max_diff(load_folder(os.path.join(args.workdir, "out_recycle_jax")),
                 load_folder(os.path.join(args.workdir, "out_mergekit")))
    print(f"wall ratio recycle_jax / mergekit: {rj / m:.3f} (goal <= 0.5); peak RSS ratio "
          f"{rss:.3f} (goal <= 1); max |difference| of the outputs {d:.3g}")


# ----------------------------------------------------------------------------- parity

def parity_configs(base: str, m: list[str]) -> dict[str, dict]:
  """One config per method, exercising per-model, global, filtered and gradient values."""
  w = lambda *ws: [{"model": x, "parameters": {"weight": v}} for x, v in zip(m, ws)]
  gta = lambda method, **g: {"merge_method": method, "base_model": base, "dtype": "float32",
                             "models": [
                                 {"model": m[0], "parameters": {"weight": 0.6,
                                                                "density": [0.3, 0.7]}},
                                 {"model": m[1], "parameters": {"weight": [
                                     {"filter": "mlp", "value": 0.9}, {"value": -0.3}],
                                     "density": 0.5}},
                                 {"model": m[2], "parameters": {"weight": 0.4,
                                                                "density": 0.6}}],
                             "parameters": {"lambda": 0.9, **g}}
  return {
      "linear": {"merge_method": "linear", "dtype": "float32", "models": w(0.5, 0.3, 0.2)},
      "linear (slices)": {"merge_method": "linear", "dtype": "float32", "slices": [
          {"sources": [{"model": x, "layer_range": [0, 1], "parameters": {"weight": v}}
                       for x, v in zip(m, (0.2, 0.3, 0.5))]},
          {"sources": [{"model": x, "layer_range": [1, 3], "parameters": {"weight": v}}
                       for x, v in zip(m, (0.6, 0.3, 0.1))]}]},
      "task_arithmetic": gta("task_arithmetic"),
      "task negation": {"merge_method": "task_arithmetic", "base_model": base,
                        "dtype": "float32", "models": w(-1.0)},
      "ties": gta("ties"),
      "breadcrumbs": gta("breadcrumbs", gamma=0.05),
      "breadcrumbs_ties": gta("breadcrumbs_ties", gamma=0.05),
      "nuslerp": {"merge_method": "nuslerp", "dtype": "float32", "models": w(0.4, 0.6)},
      "nuslerp (base, row-wise)": {"merge_method": "nuslerp", "base_model": base,
                                   "dtype": "float32", "models": w(0.4, 0.6),
                                   "parameters": {"nuslerp_flatten": False,
                                                  "nuslerp_row_wise": True}},
      "multislerp": {"merge_method": "multislerp", "base_model": base, "dtype": "float32",
                     "models": w(0.5, 0.3, 0.2)},
      "karcher": {"merge_method": "karcher", "dtype": "float32",
                  "models": [{"model": x} for x in m]},
      "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                      "models": [{"model": x} for x in m]},
      "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                "models": [{"model": m[0]}], "parameters": {"t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"value": 0.4}]}},
      "sce": {"merge_method": "sce", "base_model": base, "dtype": "float32",
              "models": [{"model": x} for x in m], "parameters": {"select_topk": 1.0}},
      "sce (select_topk gradient)": {
          "merge_method": "sce", "base_model": base, "dtype": "float32",
          "models": [{"model": x} for x in m], "parameters": {"select_topk": [0.2, 0.7]}},
      "nearswap": {"merge_method": "nearswap", "base_model": base, "dtype": "float32",
                   "models": [{"model": m[0]}], "parameters": {"t": [
                       {"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]}},
      "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base,
                       "dtype": "float32", "models": [{"model": m[0]}]},
  }


RANDOM = {"dare_linear": {}, "dare_ties": {}, "della": {"epsilon": 0.1},
          "della_linear": {"epsilon": 0.1}}


def kept_and_l1(out: dict, base: dict, model: dict) -> tuple[float, float]:
  """Fraction of entries moved from the base, and |out - base|_1 / |model - base|_1."""
  moved = sum(int(np.count_nonzero(out[k] != base[k])) for k in out)
  total = sum(out[k].size for k in out)
  l1 = sum(float(np.abs(out[k] - base[k]).sum()) for k in out)
  return moved / total, l1 / sum(float(np.abs(model[k] - base[k]).sum()) for k in out)


def parity(args, mk) -> None:
  assert mk, "parity needs mergekit: pass --mergekit_venv or set MERGEKIT_VENV"
  base, *m = build_models(args.workdir, 3, args.hidden, args.layers, args.vocab, "float32",
                          with_base=True)
  rows = []
  cases = parity_configs(base, m)
  cases.update({f"{k} (one model)": {"merge_method": k, "base_model": base,
                                     "dtype": "float32", "models": [
                                         {"model": m[0], "parameters": {
                                             "weight": 1.0, "density": 0.4}}],
                                     "parameters": v} for k, v in RANDOM.items()})
  for name, cfg in cases.items():
    if args.methods and not any(name.startswith(x) for x in args.methods.split(",")):
      continue
    path = write_yaml(os.path.join(args.workdir, name.split()[0] + ".yml"), cfg)
    outs = {}
    for tool, cmd, env in (("mergekit", mk, MK_ENV), ("recycle_jax", recycle_cmd, RJ_ENV)):
      outs[tool] = os.path.join(args.workdir, f"out_{tool}")
      shutil.rmtree(outs[tool], ignore_errors=True)
      try:
        run(cmd(path, outs[tool]), env)
      except RuntimeError as e:
        rows.append((name, f"{tool} failed: {str(e).splitlines()[-1][:80]}"))
        break
    else:
      a, b = load_folder(outs["recycle_jax"]), load_folder(outs["mergekit"])
      if "one model" in name:
        bb, mm = load_folder(base), load_folder(m[0])
        (ka, la), (kb, lb) = kept_and_l1(a, bb, mm), kept_and_l1(b, bb, mm)
        rows.append((name, f"kept {ka:.4f} vs {kb:.4f}, L1 ratio {la:.4f} vs {lb:.4f}"))
      else:
        rows.append((name, f"{max_diff(a, b):.3g}"))
    print(f"| {rows[-1][0]} | {rows[-1][1]} |", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--mode", choices=["speed", "parity"], default="speed")
  p.add_argument("--mergekit_venv", default=os.environ.get("MERGEKIT_VENV"))
  p.add_argument("--models", type=int, default=8)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--methods", default="", help="parity: only these (comma-separated)")
  p.add_argument("--size", choices=sorted(SIZES), default=None,
                 help="speed: folders of about this many MB each (sets hidden/layers/vocab)")
  p.add_argument("--compare", default="",
                 help="speed: also time the recycle_jax package at this checkout")
  args = p.parse_args()
  if args.size:
    args.hidden, args.layers, args.vocab = SIZES[args.size]
  os.makedirs(args.workdir, exist_ok=True)
  mk = mergekit_cmd(args.mergekit_venv)
  if not mk:
    print("mergekit not found (--mergekit_venv / MERGEKIT_VENV): recycle_jax only")
  if args.mode == "parity":
    if args.hidden == 256 and args.layers == 4:  # parity: small float32 folders
      args.hidden, args.layers, args.vocab = 64, 3, 256
    print("| method | max abs difference vs mergekit 0.1.5 |\n|---|---|")
    parity(args, mk)
  else:
    speed(args, mk)


if __name__ == "__main__":
  main()
