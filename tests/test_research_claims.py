"""experiments/research_claims.py's pooled table on synthetic seeds (no model): pairs by
setting and seed, against the reference and the same configuration at full fidelity."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import research_claims  # noqa: E402


def _seeds(search, best_single=50.0):
  return [{"methods": {"search": {"fitness": {"test": t}},
                       "best_single": {"fitness": {"test": best_single}},
                       "uniform": {"fitness": {"test": 30.0}}}} for t in search]


def _row(setting, strategy, param, fid, dev_examples=600.0):
  return {"name": f"{setting}/{strategy}-{param}-{fid}", "setting": setting,
          "strategy": strategy, "parametrization": param, "fidelity": fid,
          "nonzero": [2, 4], "candidates_nonzero": 8.0, "per_merge_s": [0.2, 0.1, 0.3],
          "dev_examples": dev_examples}


def test_pooled_table_pairs_by_setting_and_seed():
  tests = {("a", "relu_normalize", "full"): [50.0, 52.0], ("b", "relu_normalize", "full"): [70.0, 70.0],
           ("a", "box", "full"): [53.0, 54.0], ("b", "box", "full"): [72.0, 73.0],
           ("a", "box", "adaptive"): [53.0, 53.0], ("b", "box", "adaptive"): [72.0, 72.0]}
  rows = [_row(s, "CMA_ES", p, f, 200.0 if f == "adaptive" else 600.0) for s, p, f in tests]
  results = {r["name"]: _seeds(tests[(r["setting"], r["parametrization"], r["fidelity"])],
                               70.0 if r["setting"] == "b" else 50.0) for r in rows}
  lines = research_claims.pooled_table(rows, results, "CMA_ES-relu_normalize-full")
  by = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
  relu, box, ada = (by[f"CMA_ES-{c}"] for c in ("relu_normalize-full", "box-full", "box-adaptive"))
  assert relu[1] == "2 × 2" and relu[5] == "–"  # the reference is not paired with itself
  # box - relu per (setting, seed): +3, +2, +2, +3; vs the best baseline: +3, +4, +2, +3.
  assert box[5].startswith("+2.5 ± ") and box[6] == "beats"
  assert box[3].startswith("+3.0 ± ") and box[4] == "beats"
  # adaptive - full: 0, -1, 0, -1; it scored a third of the dev examples.
  assert ada[9] == "0.33" and ada[10].startswith("-0.5 ± ") and ada[10].endswith("ties")
  assert float(ada[11].strip(" |")) == np.median([0.2, 0.1, 0.3, 0.2, 0.1, 0.3])
