"""Baselines: the paper's, from the single checkpoints' dev scores, and further merges.

  best_single    the checkpoint with the highest dev fitness (macro-average)
  best_per_task  for each task, the checkpoint best on that task's dev split (an oracle
                 row: no single model, reported per task)
  uniform        the uniform soup, alpha_i = 1/N
  merge_best     uniform average of the per-task best checkpoints
  greedy_soup    Wortsman et al.'s greedy soup (merging.greedy_soup; needs dev evaluations)
  task_arithmetic, ties, dare_linear, dare_ties
                 task-vector merges against the base checkpoint, uniform weights, lam
                 chosen on dev (task_vector_baselines)
"""
from __future__ import annotations

from typing import Sequence

import gin
import numpy as np

from recycle_jax import merging


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


TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


@gin.configurable
def task_vector_baselines(n: int, methods: Sequence[str] = TASK_VECTOR_METHODS,
                          lams: Sequence[float] = (0.5, 1.0, 1.5, 2.0), density: float = 0.5,
                          seed: int = 0) -> dict[str, tuple[merging.MergeSpace, np.ndarray]]:
  """Per method, a space whose hyperparameters are part of the point, and the candidate
  points [K, N + H]: uniform weights, each lam of `lams` (chosen on dev, as the methods'
  papers do) and a fixed density. One compiled merge serves all of a method's candidates.

  lam multiplies the weighted average of the task vectors: lam = 1 with uniform weights is
  the uniform soup for task arithmetic, lam = N the sum of task vectors.
  """
  out = {}
  for m in methods:
    tuned = merging.HPARAMS[m]
    space = merging.MergeSpace(m, n, tuned=tuned, hparams=(), seed=seed)
    values = [{"lam": lam, "density": density} for lam in lams]
    points = np.asarray([np.concatenate([np.full(n, 1.0 / n), [v[k] for k in tuned]])
                         for v in values], np.float32)
    out[m] = (space, points)
  return out
