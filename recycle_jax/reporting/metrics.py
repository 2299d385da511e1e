"""The search history of results.json as TensorBoard scalars (clu metric_writers).

workdir/tb is derived data: it is rewritten from `results` on every call, so a resumed
run never shows duplicated points.
"""
from __future__ import annotations

import math
import os
import shutil

TB_DIR = "tb"


def eval_scalars(history: list[dict]) -> list[tuple[int, dict[str, float]]]:
  """(step, scalars) per evaluated merge, seeds included, in evaluation order."""
  out, best = [], -math.inf
  for i, h in enumerate(history):
    if h["fitness"] is None:  # NaN merges have no fitness
      continue
    best = max(best, h["fitness"])
    out.append((i, {f"fitness/{h['kind']}": h["fitness"], "fitness/best_so_far": best}))
  return out


def generation_scalars(history: list[dict], pop_size: int | None
                       ) -> list[tuple[int, dict[str, float]]]:
  """(generation, best and mean fitness) of each search generation of `pop_size` merges."""
  fit = [h["fitness"] for h in history if h["kind"] == "search"]
  if not pop_size:
    return []
  out = []
  for g in range(len(fit) // pop_size):
    vals = [f for f in fit[g * pop_size:(g + 1) * pop_size] if f is not None]
    if vals:
      out.append((g, {"generation/best": max(vals), "generation/mean": sum(vals) / len(vals)}))
  return out


def method_scalars(results: dict) -> dict[str, float]:
  return {f"methods/{m}/{split}": v for m, r in results["methods"].items()
          for split, v in r["fitness"].items() if v is not None}


def write_history(workdir: str, results: dict) -> str:
  """Writes workdir/tb (TensorBoard event files); returns that directory."""
  from clu import metric_writers  # imports TensorFlow: only when metrics are written
  logdir = os.path.join(workdir, TB_DIR)
  shutil.rmtree(logdir, ignore_errors=True)
  writer = metric_writers.SummaryWriter(logdir)
  try:
    pop = results.get("config", {}).get("population_size")
    for step, scalars in eval_scalars(results["history"]) + \
        generation_scalars(results["history"], pop):
      writer.write_scalars(step, scalars)
    writer.write_scalars(0, method_scalars(results))
    writer.flush()
  finally:
    writer.close()
  return logdir
