"""examples/byo_pool runs as its README says: three Hugging Face checkpoints with their own
BPE tokenizer, a JSONL task, a search writing the merge as a Hugging Face folder, and
that folder loaded back into transformers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recycle_jax import cli

pytestmark = pytest.mark.slow  # the example end to end: `make test-slow` (CI)

import transformers  # noqa: E402 (pinned test dependency)
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "byo_pool")


def test_byo_pool_example(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(EXAMPLE)
  import build_pool
  manifest = build_pool.main(str(tmp_path / "pool"), steps=4)
  run = tmp_path / "run"
  assert cli.main(["search", f"--gin_file={os.path.join(EXAMPLE, 'search.gin')}",
                   f"--gin_bindings=Experiment.pool={manifest!r}",
                   "--gin_bindings=SearchConfig.budget=6",
                   "--gin_bindings=Experiment.greedy_soup=False",
                   f"--workdir={run}"]) == 0
  results = json.loads((run / "results.json").read_text())
  weights = results["methods"]["search"]["weights"]
  merged = run / "merged"
  model = transformers.AutoModelForCausalLM.from_pretrained(merged)
  members = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pool" / m)
             for m in ("qa", "mixed", "sounds")]
  w = [weights[m] for m in ("qa", "mixed", "sounds")] if isinstance(weights, dict) else weights
  for k, v in model.state_dict().items():
    want = sum(a * m.state_dict()[k].numpy() for a, m in zip(w, members))
    np.testing.assert_allclose(v.numpy(), want, atol=1e-4)
  out = subprocess.run([sys.executable, os.path.join(EXAMPLE, "load_merged.py"), str(merged)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "new tokens" in out.stdout
