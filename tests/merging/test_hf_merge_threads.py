"""The Hugging Face folder merge on worker threads: the same bytes as on one thread, a
non-finite input refused by name with nothing written, and the first failure raised."""
import os

import numpy as np
import pytest
import yaml

from recycle_jax.checkpoint_io import mergekit_config
from recycle_jax.merging import hf_merge
from recycle_jax.runtime.errors import UserError
from checkpoint_io.test_mergekit_config import _tensors, read, write_folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  d = tmp_path_factory.mktemp("threads")
  rng = np.random.default_rng(1)
  base = _tensors(rng, np.float32)
  out = []
  for i in range(4):
    t = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    out.append(write_folder(str(d / f"m{i}"), t))
  return out


def _plan(tmp_path, models, name="merge.yml"):
  p = tmp_path / name
  p.write_text(yaml.safe_dump({
      "merge_method": "linear", "dtype": "bfloat16",
      "models": [{"model": m, "parameters": {"weight": w}}
                 for m, w in zip(models, (0.4, 0.3, 0.2, 0.1))]}))
  return mergekit_config.load(str(p))


def test_threads_write_the_bytes_one_thread_writes(pool, tmp_path, monkeypatch):
  threaded = hf_merge.merge(_plan(tmp_path, pool), str(tmp_path / "a"), fsync=False)
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  single = hf_merge.merge(_plan(tmp_path, pool), str(tmp_path / "b"), fsync=False)
  a, b = read(threaded), read(single)
  assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_a_non_finite_input_is_refused_by_model_and_tensor(pool, tmp_path):
  bad = read(pool[2])
  bad["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
  folder = write_folder(str(tmp_path / "bad"), bad)
  out = tmp_path / "out"
  with pytest.raises(UserError, match="bad holds NaN or Inf values in tensor "
                     "model.layers.1.mlp.up_proj.weight"):
    hf_merge.merge(_plan(tmp_path, [*pool[:2], folder, pool[3]]), str(out), fsync=False)
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_run_threaded_raises_the_first_failure_in_order():
  done = []

  def fn(i):
    if i in (3, 5):
      raise ValueError(i)
    done.append(i)

  with pytest.raises(ValueError, match="3"):
    hf_merge.run_threaded(fn, [(i,) for i in range(40)], [1] * 40, workers=2)
  assert {0, 1, 2} <= set(done) and max(done) < 3 + 2 * 2 + 1  # bounded look-ahead
