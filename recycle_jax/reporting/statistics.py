"""Statistics of results: the mean and 95% CI of a metric over seeds, paired differences
with a verdict, and the Spearman matrix and tradeoff summary of a pool's task scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np



# ----------------------------------------------------------------------------- seeds

def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
  """(mean, half-width of the t-interval, n) of the finite values; half-width NaN if n < 2."""
  from scipy.stats import t as student_t
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if len(v) == 0:
    return float("nan"), float("nan"), 0
  if len(v) == 1:
    return float(v[0]), float("nan"), 1
  half = student_t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
  return float(v.mean()), float(half), len(v)


def paired(a, b, level: float = 0.95) -> dict:
  """The paired difference a - b over seeds: mean, CI half-width (t-distribution), n, and
  the verdict the interval supports: 'beats' (all of it above 0), 'loses' (all below),
  'ties' (it holds 0); one pair has no interval: 'n/a'."""
  d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
  m, h, n = mean_ci(d, level)
  if n < 2:
    verdict = "n/a"
  elif m - h > 0:
    verdict = "beats"
  elif m + h < 0:
    verdict = "loses"
  else:
    verdict = "ties"
  return {"mean": m, "ci95": h, "n": n, "verdict": verdict}


def fmt_ci(values, digits: int = 1) -> str:
  """'mean ± half-width' (95% t-interval) of the finite values; the mean alone for one."""
  m, h, n = mean_ci(values)
  if n == 0:
    return "–"
  return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if n > 1 else "")


# ----------------------------------------------------------------------------- pool

def spearman_matrix(scores: np.ndarray) -> np.ndarray:
  """[N, T] scores -> [T, T] Spearman rank correlation across the N checkpoints."""
  from scipy.stats import rankdata
  ranks = np.apply_along_axis(rankdata, 0, np.asarray(scores, np.float64))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.corrcoef(ranks, rowvar=False)


def tradeoff_summary(names: Sequence[str], tasks: Sequence[str], scores: np.ndarray) -> dict:
  """The checks issue 'embedded benchmark' asks of a pool, measured not assumed."""
  rho = spearman_matrix(scores)
  iu = np.triu_indices(len(tasks), 1)
  pairs = sorted(((float(rho[i, j]), tasks[i], tasks[j]) for i, j in zip(*iu)),
                 key=lambda x: (np.nan_to_num(x[0], nan=9), x[1]))
  best_everywhere = [n for k, n in enumerate(names)
                     if all(scores[k, t] >= scores[:, t].max() for t in range(len(tasks)))]
  return {"spearman": rho, "most_negative": pairs[0] if pairs else None,
          "best_on_every_task": best_everywhere}
