"""`recycle-jax inspect`: the pool table comes from metadata and the manifest alone."""
import json
import os

import pytest

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax import cli
from recycle_jax.checkpoint_io import inspection
from recycle_jax.checkpoint_io import checkpoints


def test_inspect_prints_pool_table(micro_pool, capsys, monkeypatch):
  # No array may be read: make restoring fail loudly.
  monkeypatch.setattr(checkpoints, "restore", lambda *a, **k: pytest.fail("restored data"))
  assert cli.main(["inspect", os.path.dirname(micro_pool)]) == 0
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.startswith("| ")]
  assert lines[0].startswith("| checkpoint | params | dtypes | size | vocab | rj_code test |")
  manifest = json.load(open(micro_pool))["checkpoints"]
  assert [l.split(" | ")[0][2:] for l in lines[1:]] == [e["name"] for e in manifest]
  code = next(e for e in manifest if e["name"] == "code")
  row = next(l for l in lines if l.startswith("| code |")).split(" | ")
  assert row[2] == "float32" and row[4] == "259"
  assert row[5] == f"{code['scores']['test']['rj_code']:.1f}"


def test_entry_row_counts_parameters_and_bytes(micro_pool):
  entry = pool_manifest.load_pool(micro_pool).entries[0]
  row = inspection.entry_row(entry)
  # micro.gin: d_model 32, 2 layers, 2 heads, 1 kv head (head_dim 16), d_ff 64, tied.
  per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
  assert row["params"] == 259 * 32 + 2 * per_layer + 32
  assert row["bytes"] >= 4 * row["params"] * 0.5 and row["dtypes"] == ["float32"]


def test_inspect_one_checkpoint_and_a_missing_path(micro_pool, capsys):
  path = pool_manifest.load_pool(micro_pool).entries[1].path
  assert cli.main(["inspect", path]) == 0
  assert f"| {os.path.basename(path)} |" in capsys.readouterr().out
  assert cli.main(["inspect", os.path.join(path, "nope.json")]) == 2
  assert "pool manifest not found" in capsys.readouterr().err


@pytest.mark.parametrize("n,units,base,text", [(999, ("", "K"), 1000, "999"),
                                               (12_345, ("", "K", "M"), 1000, "12.3K"),
                                               (3 << 20, ("B", "KiB", "MiB"), 1024, "3.0MiB")])
def test_human(n, units, base, text):
  assert inspection.human(n, units, base) == text
