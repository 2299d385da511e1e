"""`recycle-jax inspect`: a pool as a table, from metadata and the manifest alone."""
from __future__ import annotations

import math
import os

import jax
import numpy as np

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints, training_run


def load_any(path: str, steps: str | None = None) -> pool_manifest.Pool:
  """A manifest, a pool directory, one checkpoint directory (a pool of one), or with
  `steps` a training run's directory (`training_run`)."""
  if steps is not None or (os.path.isdir(path) and training_run.find_steps(path)):
    return pool_manifest.load_pool(path, steps)  # (a run without --steps: refused there)
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "pool.json")):
    return pool_manifest.make_pool([pool_manifest.Entry(os.path.basename(os.path.normpath(path)),
                                                    os.path.abspath(path))], path)
  return pool_manifest.load_pool(path)


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


def entry_row(entry: pool_manifest.Entry) -> dict:
  meta = checkpoints.read_metadata(entry.path, entry.name, entry.subtree)
  leaves = jax.tree.leaves(meta.abstract)
  model = meta.model_config or {}
  return {"name": entry.name,
          "params": int(sum(math.prod(x.shape) for x in leaves)),
          "dtypes": sorted({np.dtype(x.dtype).name for x in leaves}),
          "bytes": disk_bytes(entry.path),
          "vocab": model.get("vocab_size"),
          "scores": entry.info.get("scores", {})}


def human(n: float, units=("", "K", "M", "G", "T"), base: int = 1000) -> str:
  i = 0
  while abs(n) >= base and i < len(units) - 1:
    n, i = n / base, i + 1
  return f"{n:.1f}{units[i]}" if i else f"{int(n)}{units[0]}"


def pool_markdown(rows: list[dict], split: str = "test") -> str:
  tasks = list(dict.fromkeys(t for r in rows for t in r["scores"].get(split, {})))
  head = ["checkpoint", "params", "dtypes", "size", "vocab"] + [f"{t} {split}" for t in tasks]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    scores = r["scores"].get(split, {})
    cells = [r["name"], human(r["params"]), ",".join(r["dtypes"]),
             human(r["bytes"], ("B", "KiB", "MiB", "GiB", "TiB"), 1024), str(r["vocab"] or "?")]
    cells += ["–" if scores.get(t) is None else f"{scores[t]:.1f}" for t in tasks]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
