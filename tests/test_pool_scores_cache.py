"""make-pool's cached checkpoint scores are reused only when every task is still scored the
same way (kind, metric, delimiter): a pool scored under older semantics is re-scored."""
import json

from recycle_jax import pools

TASKS = ["rj_math", "rj_instruct", "rj_knowledge"]


def test_scoring_key_names_each_tasks_metric():
  key = pools.scoring_key(TASKS)
  assert "metric='flexible-extract'" in key[0] and "metric='is_greedy_eos'" in key[1]
  assert "metric='acc'" in key[2] and "target_delimiter=''" in key[2]


def test_scores_cached_under_other_semantics_are_not_reused(tmp_path):
  manifest = tmp_path / "pool.json"
  manifest.write_text("{}")
  meta = {"eval_tasks": TASKS, "max_eval_examples": None}
  (tmp_path / "pool_meta.json").write_text(json.dumps(meta))  # before: no scoring key
  assert pools._old_scores(str(manifest), TASKS, None) == {}
  meta["scoring"] = [k.replace("'acc'", "'acc_mean_token'") for k in pools.scoring_key(TASKS)]
  (tmp_path / "pool_meta.json").write_text(json.dumps(meta))
  assert pools._old_scores(str(manifest), TASKS, None) == {}
