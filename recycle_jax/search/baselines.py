"""Baselines: the paper's, from the single checkpoints' dev scores, and further merges.

  best_single    the checkpoint with the highest dev fitness (macro-average)
  best_per_task  for each task, the checkpoint best on that task's dev split (an oracle
                 row: no single model, reported per task)
  uniform        the uniform soup, alpha_i = 1/N
  merge_best     uniform average of the per-task best checkpoints
  greedy_soup    Wortsman et al.'s greedy soup (merging.greedy_soup; needs dev evaluations)
  the registry's baseline methods (methods.REGISTRY, `baseline=True`: task arithmetic,
                 TIES, DARE), uniform weights, lam chosen on dev (task_vector_baselines)
A pool that is one training run's steps (in step order) adds (training_run_weights):
  lawa           the uniform average of the last K checkpoints (Kaddour 2022's LAWA)
  ema            the exponential moving average over the checkpoints, started at the first
                 (e <- decay * e + (1 - decay) * theta_i, one update per checkpoint)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from recycle_jax.merging import methods as merge_methods
from recycle_jax.merging import spaces
from recycle_jax.runtime.errors import check


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


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A baseline computed from the single checkpoints' dev scores (no merge method)."""
  name: str
  marker: str | None  # matplotlib marker in the figures; None: not one point (an oracle)


LINEAR_BASELINES = (Baseline("best_single", "s"), Baseline("best_per_task", None),
                    Baseline("uniform", "D"), Baseline("merge_best", "P"),
                    Baseline("greedy_soup", "X"))
RUN_BASELINES = (Baseline("lawa", "p"), Baseline("ema", "d"))  # a training run's pool only
SEARCH = "search"  # the search's own row
HEADLINE = (SEARCH, "uniform", "merge_best", "best_single")  # the paper's comparison


def report_order() -> tuple[str, ...]:
  """Rows of the report: the linear baselines, the registry's non-linear methods, search."""
  return (tuple(b.name for b in LINEAR_BASELINES) +
          tuple(m for m in merge_methods.REGISTRY if m != "linear") +
          tuple(b.name for b in RUN_BASELINES) + (SEARCH,))


def markers() -> dict[str, str]:
  """The figures' marker of every row that is drawn as one point, in report order."""
  out = {b.name: b.marker for b in LINEAR_BASELINES if b.marker}
  out.update({m.name: m.marker for m in merge_methods.REGISTRY.values() if m.marker})
  out.update({b.name: b.marker for b in RUN_BASELINES})
  return {**out, SEARCH: "*"}


def lawa_weights(n: int, k: int | None = None) -> np.ndarray:
  """[N] alphas of LAWA over a pool of n checkpoints in step order: 1/k on the last k
  (k None: all n)."""
  k = n if k is None else k
  check(1 <= k <= n, f"lawa_k={k} but the run's pool has {n} checkpoints",
        "training_run_weights.lawa_k", f"choose 1..{n} (or None: all)")
  w = np.zeros(n, np.float64)
  w[n - k:] = 1.0 / k
  return w.astype(np.float32)


def ema_weights(n: int, decay: float) -> np.ndarray:
  """[N] alphas of the exponential moving average over n checkpoints in step order,
  started at the first: theta_0 gets decay^(n-1), theta_i (i >= 1) (1 - decay) *
  decay^(n-1-i); they sum to 1. decay in [0, 1]: 0 is the last checkpoint alone, 1 the
  first."""
  check(0.0 <= decay <= 1.0, f"ema_decay={decay} is not in [0, 1]",
        "training_run_weights.ema_decay", "choose e.g. 0.5")
  i = np.arange(n)
  w = (1.0 - decay) * decay ** (n - 1 - i).astype(np.float64)
  w[0] = decay ** (n - 1)
  return w.astype(np.float32)


def training_run_weights(n: int, lawa_k: int | None = None,
                         ema_decay: float = 0.5) -> dict[str, np.ndarray]:
  """{'lawa': [N], 'ema': [N]} for a pool of one run's n checkpoints in step order."""
  return {"lawa": lawa_weights(n, lawa_k), "ema": ema_weights(n, ema_decay)}


def method_baselines(n: int, has_base: bool,
                     names: Sequence[str] | None = None) -> tuple[str, ...]:
  """The registry's baseline methods that apply to a pool of n (with or without a base)."""
  names = merge_methods.baseline_methods() if names is None else names
  where = "task_vector_baselines.methods"
  return tuple(m for m in names if merge_methods.get(m, where).applies_to(n, has_base))


def task_vector_baselines(n: int, has_base: bool = True, methods: Sequence[str] | None = None,
                          lams: Sequence[float] = (0.5, 1.0, 1.5, 2.0), density: float = 0.5,
                          seed: int = 0) -> dict[str, tuple[spaces.MergeSpace, np.ndarray]]:
  """Per method, a space whose hyperparameters are part of the point, and the candidate
  points [K, N + H]: uniform weights, each lam of `lams` (chosen on dev, as the methods'
  papers do), a fixed density and the registry's defaults for any other hyperparameter.
  One compiled merge serves all of a method's candidates. methods: the registry's baseline
  methods by default; only those that apply to the pool (its size, a base) are kept.

  lam multiplies the weighted average of the task vectors: lam = 1 with uniform weights is
  the uniform soup for task arithmetic, lam = N the sum of task vectors.
  """
  out = {}
  for m in method_baselines(n, has_base, methods):
    spec = merge_methods.get(m, "task_vector_baselines.methods")
    tuned = spec.hparam_names
    space = spaces.MergeSpace(m, n, tuned=tuned, hparams=(), seed=seed)
    values = [{**{h.name: h.default for h in spec.hparams}, "lam": lam, "density": density}
              for lam in (lams if "lam" in tuned else lams[:1])]
    points = np.asarray([np.concatenate([np.full(n, 1.0 / n), [v[k] for k in tuned]])
                         for v in values], np.float32)
    out[m] = (space, points)
  return out
