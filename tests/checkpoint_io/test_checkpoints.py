"""Pool manifests and validation from Orbax metadata alone."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.runtime import outputs
from recycle_jax.models import transformer
from recycle_jax.runtime.errors import UserError

CFG = transformer.ModelConfig(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)


def _write(path, cfg=CFG, seed=0, mutate=None):
  params = transformer.init_params(cfg, jax.random.key(seed))
  if mutate:
    params = mutate(params)
  checkpoints.save(str(path), params, {"model": cfg.to_dict()})
  return params


def _manifest(tmp_path, names):
  with open(tmp_path / "pool.json", "w") as f:
    json.dump({"checkpoints": [{"name": n, "path": n} for n in names]}, f)
  return str(tmp_path / "pool.json")


def test_manifest_relative_paths_and_roundtrip(tmp_path):
  for n in ("a", "b"):
    _write(tmp_path / n)
  pool = pool_manifest.load_pool(_manifest(tmp_path, ["a", "b"]))
  assert pool.names == ["a", "b"] and pool.paths[0] == str(tmp_path / "a")
  meta = checkpoints.validate_pool(pool)
  assert meta.model_config["d_model"] == 16
  params = checkpoints.restore_pool(pool, meta.abstract)
  ref = transformer.init_params(CFG, jax.random.key(0))
  np.testing.assert_array_equal(params[0]["embed"]["embedding"], ref["embed"]["embedding"])
  assert pool_manifest.load_pool(str(tmp_path)).names == ["a", "b"]  # a directory works too


def test_gin_list_pool(tmp_path):
  _write(tmp_path / "a")
  pool = pool_manifest.load_pool([("x", str(tmp_path / "a"))])
  assert pool.names == ["x"]


def test_bad_pool_is_rejected_before_any_array_is_read(tmp_path, monkeypatch):
  _write(tmp_path / "a")
  _write(tmp_path / "b", transformer.ModelConfig(**{**CFG.to_dict(), "d_ff": 48}))
  pool = pool_manifest.load_pool(_manifest(tmp_path, ["a", "b"]))
  def no_reads(*a, **k):
    raise AssertionError("array data was read")
  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", no_reads)
  with pytest.raises(UserError, match=r"d_ff 48 vs 32.*checkpoint 'b'"):
    checkpoints.validate_pool(pool)


def test_dtype_and_tree_mismatch_name_the_checkpoint_and_parameter(tmp_path):
  _write(tmp_path / "a")
  _write(tmp_path / "b", mutate=lambda p: jax.tree.map(lambda x: x.astype(np.float16), p))
  _write(tmp_path / "c", transformer.ModelConfig(**{**CFG.to_dict(), "tie_embeddings": False}))
  with pytest.raises(UserError, match=r"dtype float16.*checkpoint 'b'"):
    checkpoints.validate_pool(pool_manifest.load_pool(_manifest(tmp_path, ["a", "b"])))
  with pytest.raises(UserError, match=r"tie_embeddings.*checkpoint 'c'"):
    checkpoints.validate_pool(pool_manifest.load_pool(_manifest(tmp_path, ["a", "c"])))


def test_missing_empty_and_corrupted_checkpoints(tmp_path):
  _write(tmp_path / "a")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="not found.*'gone'"):
    checkpoints.validate_pool(pool_manifest.load_pool(_manifest(tmp_path, ["a", "gone"])))
  with pytest.raises(UserError, match="empty.*'empty'"):
    checkpoints.validate_pool(pool_manifest.load_pool(_manifest(tmp_path, ["a", "empty"])))
  _write(tmp_path / "bad")
  with open(tmp_path / "bad" / "_METADATA", "w") as f:
    f.write("{truncated")
  with pytest.raises(UserError, match="unreadable.*'bad'"):
    checkpoints.validate_pool(pool_manifest.load_pool(_manifest(tmp_path, ["a", "bad"])))


def test_manifest_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    pool_manifest.load_pool(str(tmp_path / "nope.json"))
  (tmp_path / "p.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    pool_manifest.load_pool(str(tmp_path / "p.json"))
  (tmp_path / "q.json").write_text(json.dumps({"checkpoints": [{"name": "a", "path": "a"},
                                                               {"name": "a", "path": "b"}]}))
  with pytest.raises(UserError, match="duplicate"):
    pool_manifest.load_pool(str(tmp_path / "q.json"))


def test_output_checks(tmp_path):
  _write(tmp_path / "a")
  with pytest.raises(UserError, match="overlaps input"):
    outputs.check_output(str(tmp_path / "a" / "sub"), [str(tmp_path / "a")])
  with pytest.raises(UserError, match="already exists"):
    outputs.check_output(str(tmp_path / "a"), [])
  outputs.check_output(str(tmp_path / "new"), [str(tmp_path / "a")])


def test_save_is_atomic_and_overwrite_replaces(tmp_path):
  p1 = _write(tmp_path / "out")
  p2 = transformer.init_params(CFG, jax.random.key(5))
  checkpoints.save(str(tmp_path / "out"), p2, {"model": CFG.to_dict()}, overwrite=True)
  meta = checkpoints.read_metadata(str(tmp_path / "out"))
  got = checkpoints.restore(str(tmp_path / "out"), meta.abstract)
  np.testing.assert_array_equal(got["embed"]["embedding"], p2["embed"]["embedding"])
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dirs left behind


def test_a_directory_that_is_no_checkpoint_is_named_as_such(tmp_path):
  """Neither Orbax's _METADATA nor a Hugging Face config.json: refused before Orbax guesses."""
  from recycle_jax.runtime.errors import UserError
  (tmp_path / "notes.txt").write_text("not weights")
  with pytest.raises(UserError, match="not a checkpoint: no _METADATA"):
    checkpoints.read_metadata(str(tmp_path))
