"""benchmarks/accelerator.py --tiny: runs on CPU end to end (the population program and
the transformers peer) and imports neither TensorFlow nor seqio."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")
RUN = f"""
import json, runpy, sys
sys.argv = [{SCRIPT!r}, "--tiny", "--json", sys.argv[1]]
try:
  runpy.run_path({SCRIPT!r}, run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps({{m: m in sys.modules for m in ("tensorflow", "seqio")}}))
"""


@pytest.mark.slow  # 30-40 s on 2 idle cores (two compiles, torch's import, the peer)
def test_tiny_runs_without_tensorflow_or_seqio(tmp_path):
  out = tmp_path / "rows.json"
  proc = subprocess.run([sys.executable, "-c", RUN, str(out)], capture_output=True,
                        text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tensorflow": False,
                                                               "seqio": False}
  assert "| tiny Llama |" in proc.stdout
  [row] = json.loads(out.read_text())["rows"]
  for key in ("compile_s_all", "merges_per_s", "candidates_per_s", "decode_tokens_per_s"):
    assert row[key] > 0
  assert row["mfu"] is None and row["peak_device_bytes"] is None  # CPU: no peak, no stats
  assert row["peer"]["device"] == "cpu" and row["peer"]["decode_tokens_per_s"] > 0
