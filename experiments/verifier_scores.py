"""How a pool's scores move when generation tasks are scored by verifiers.

For every checkpoint of a pool, each `generate` task (default rj_code and rj_math) is
scored twice on dev and test: as before (`exact`: teacher-forced exact match of the
reference + EOS) and as now (greedy decoding, then the task's verifier). Prints a
markdown table.

  python experiments/verifier_scores.py --pool=runs/pool/pool.json
"""
import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.models import transformer
from recycle_jax.evaluation import scoring, vocabularies  # noqa: E402


def splits_as(kind_of: dict, names, split, max_examples, vocab):
  """The splits materialized with each task's scoring replaced by `kind_of[name]`."""
  task_splits._MATERIALIZED.clear()
  for name in names:
    scoring.declare(name, kind_of[name])
  return task_splits.load_split(names, split, max_examples, vocab)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pool", required=True)
  ap.add_argument("--tasks", default="rj_code,rj_math")
  ap.add_argument("--max_examples", type=int, default=None)
  args = ap.parse_args()
  pool = pool_manifest.load_pool(args.pool)
  meta = checkpoints.validate_pool(pool)
  cfg = transformer.ModelConfig(**meta.model_config)
  score = jax.jit(scorers.make_scorer(transformer.Decoder(cfg)))
  names = args.tasks.split(",")
  vocab = vocabularies.for_evaluation(meta.tokenizer, cfg.vocab_size, pool.source)
  splits = ("dev", "test")
  now = {t: scoring.of(task_splits.bound_task(t, vocab), False) for t in names}
  exact = {t: scoring.Scoring("exact") for t in names}
  before = {s: splits_as(exact, names, s, args.max_examples, vocab) for s in splits}
  after = {s: splits_as(now, names, s, args.max_examples, vocab) for s in splits}
  print("| checkpoint | " + " | ".join(f"{t} {s}: exact → verifier" for s in splits
                                        for t in names) + " |")
  print("|---" * (1 + len(names) * len(splits)) + "|")
  moved = []
  for e in pool.entries:
    params = checkpoints.restore(e.path, meta.abstract, e.name)
    cells = []
    for s in splits:
      b = scorers.evaluate(score, params, before[s])
      a = scorers.evaluate(score, params, after[s])
      moved.append(a - b)
      cells += [f"{x:.1f} → {y:.1f}" for x, y in zip(b, a)]
    print(f"| {e.name} | " + " | ".join(cells) + " |")
  moved = np.concatenate(moved)
  print(f"\nchange (verifier - exact), points: mean {moved.mean():+.2f}, "
        f"min {moved.min():+.2f}, max {moved.max():+.2f}")


if __name__ == "__main__":
  main()
