"""The paper's baselines, from the single checkpoints' dev scores alone.

  best_single    the checkpoint with the highest dev fitness (macro-average)
  best_per_task  for each task, the checkpoint best on that task's dev split (an oracle
                 row: no single model, reported per task)
  uniform        the uniform soup, alpha_i = 1/N
  merge_best     uniform average of the per-task best checkpoints
"""
from __future__ import annotations

import numpy as np


def per_task_best(single_scores: np.ndarray) -> np.ndarray:
  """[N, T] dev scores -> [T] checkpoint index per task (first on ties)."""
  return np.argmax(np.nan_to_num(single_scores, nan=-np.inf), axis=0)


def baseline_weights(single_scores: np.ndarray) -> dict[str, np.ndarray]:
  """[N, T] dev scores of the single checkpoints -> {method: alphas [N]}."""
  n = single_scores.shape[0]
  fitness = np.nan_to_num(single_scores.mean(-1), nan=-np.inf)
  eye = np.eye(n, dtype=np.float32)
  chosen = np.unique(per_task_best(single_scores))
  merge_best = np.zeros(n, np.float32)
  merge_best[chosen] = 1.0 / len(chosen)
  return {"best_single": eye[int(np.argmax(fitness))],
          "uniform": np.full(n, 1.0 / n, np.float32),
          "merge_best": merge_best}
