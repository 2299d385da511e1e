"""The out-of-core merge: equal to the in-memory merge, chunked, NaN-safe, atomic."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax import cli
from recycle_jax.merging import kernels, streaming
from recycle_jax.models import partitioning
from recycle_jax.runtime.errors import UserError

ALPHAS = np.asarray([0.2, 0.3, 0.5], np.float32)


def budget_mb(block_bytes: int) -> float:
  """The memory budget that makes float32 blocks of `block_bytes`."""
  return block_bytes * streaming.BLOCKS_IN_BUDGET / 2**20


def _pool(micro_pool):
  pool = pool_manifest.load_pool(micro_pool)
  return pool, checkpoints.validate_pool(pool)


def _in_memory(pool, meta, alphas):
  params = checkpoints.restore_pool(pool, meta.abstract)
  return jax.tree.map(np.asarray, kernels.linear(alphas, params))


def _restored(path):
  meta = checkpoints.read_metadata(path)
  return jax.tree.map(np.asarray, checkpoints.restore(path, meta.abstract))


def _assert_close(a, b):
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, partitioning.path_str(p)
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=partitioning.path_str(p))


def _snapshot(dirs):
  """(path, size, mtime) of every file: inputs must come out untouched."""
  return sorted((f, os.path.getsize(f), os.stat(f).st_mtime_ns)
                for d in dirs for f in glob.glob(os.path.join(d, "**"), recursive=True)
                if os.path.isfile(f))


def _write_shapes(path):
  with open(os.path.join(path, "_METADATA")) as f:
    return streaming.write_shapes(json.load(f))


# ----------------------------------------------------------------------------- planning

def test_units_follow_stored_chunks():
  leaf = streaming.Leaf(("w",), (64, 8), np.dtype(np.float32), (8, 8))  # 32 B a row
  assert streaming.unit_shape(leaf, 32 * 20) == (16, 8)  # two whole chunks fit, not 20 rows
  assert streaming.unit_shape(leaf, 32 * 5) == (5, 8)  # a chunk does not fit: rows that do
  assert streaming.unit_shape(leaf, 1) == (1, 1)  # one element (the last axis is cut)
  assert streaming.unit_shape(leaf, 1 << 30) == (64, 8)  # never more than the leaf
  assert streaming.units(leaf, (24, 8)) == [(0, 0), (24, 0), (48, 0)]
  assert streaming.region(leaf, (24, 8), (48, 0)) == (slice(48, 64), slice(0, 8))
  assert streaming.batches(leaf, (8, 8), 32 * 20) == [[(0, 0), (8, 0)], [(16, 0), (24, 0)],
                                                      [(32, 0), (40, 0)], [(48, 0), (56, 0)]]
  # bytes of a 5-row unit at row 5: rows 5..7 of chunk 0, rows 0..1 of chunk 1
  assert streaming.pieces(leaf, (5, 8), (5, 0)) == [((0, 0), 5 * 32, 3 * 32, 0),
                                                    ((1, 0), 0, 2 * 32, 3 * 8)]
  cols = streaming.Leaf(("w",), (64, 8), np.dtype(np.float32), (64, 2))  # column shards
  assert streaming.unit_shape(cols, 64 * 4 * 5) == (64, 2)
  assert streaming.units(cols, (64, 2)) == [(0, 0), (0, 2), (0, 4), (0, 6)]
  assert streaming.unit_shape(cols, 4 * 2 * 10) == (10, 2)
  big = streaming.Leaf(("w",), (4, 100), np.dtype(np.float32), (4, 100))  # a row > budget
  assert streaming.unit_shape(big, 4 * 30) == (1, 30)
  assert streaming.pieces(big, (1, 30), (2, 60)) == [((0, 0), (200 + 60) * 4, 30 * 4, 0)]
  assert streaming.region(big, (1, 30), (2, 90)) == (slice(2, 3), slice(90, 100))
  scalar = streaming.Leaf(("s",), (), np.dtype(np.float32), ())
  assert streaming.unit_shape(scalar, 1) == () and streaming.units(scalar, ()) == [()]


# ----------------------------------------------------------------------------- merging

@pytest.mark.parametrize("chunked", [False, True])
def test_streaming_equals_in_memory(micro_pool, tmp_path, chunked):
  pool, meta = _pool(micro_pool)
  before = _snapshot(pool.paths)
  out = str(tmp_path / "merged")
  budget = budget_mb(20 * 32 * 4) if chunked else 256  # 20 rows of the embedding, or all
  streaming.merge_to_disk(pool, meta, ALPHAS, out, memory_budget_mb=budget)
  _assert_close(_restored(out), _in_memory(pool, meta, ALPHAS))
  assert checkpoints.read_metadata(out).custom[checkpoint_meta.META_KEY] == {
      "model": meta.model_config,
      "merge": {"method": "linear", "weights": [float(a) for a in ALPHAS],
                "pool": pool.names},
      "vocabulary": meta.tokenizer.describe()}  # the pool's tokenizer kept
  assert _snapshot(pool.paths) == before
  assert _write_shapes(out)["embed.embedding"] == ([20, 32] if chunked else [259, 32])


@pytest.mark.parametrize("compress,mapped,ocdbt", [(False, True, True), (False, False, True),
                                                   (True, True, True), (False, True, False)])
def test_raw_reads_of_uncompressed_inputs(micro_pool, tmp_path, monkeypatch, compress, mapped,
                                          ocdbt):
  """Uncompressed inputs are read as bytes from their files (OCDBT data files, or Orbax's
  file-per-chunk layout; summed from their mapped pages, or read with pread), zstd ones
  through tensorstore, edge units and all; all give the in-memory merge."""
  monkeypatch.setattr(streaming, "MAPPED", mapped)
  pool, meta = _pool(micro_pool)
  import orbax.checkpoint as ocp
  entries = []
  for e in pool.entries:
    path = str(tmp_path / e.name)
    handler = ocp.PyTreeCheckpointHandler(use_compression=compress, use_ocdbt=ocdbt)
    ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(
        checkpoints.restore(e.path, meta.abstract)),
        custom_metadata={checkpoint_meta.META_KEY: {"model": meta.model_config}})
    entries.append(pool_manifest.Entry(e.name, path))
  plain = pool_manifest.make_pool(entries)
  pmeta = checkpoints.validate_pool(plain)
  out = str(tmp_path / "merged")
  stats = streaming.merge_to_disk(plain, pmeta, ALPHAS, out,
                                  memory_budget_mb=budget_mb(6 * 32 * 4))  # 6-row units
  assert set(stats) == ({"tensorstore"} if compress else {"raw"}), stats
  _assert_close(_restored(out), _in_memory(plain, pmeta, ALPHAS))
  # the output's chunks are stored values of whole chunks; an edge chunk's padding is zeros
  index = streaming.ocdbt_index(out, ts.Context())
  edge = index[b"embed.embedding/43.0"]  # rows 258..263 of 259: 1 real, 5 padding
  with open(edge[0], "rb") as f:
    f.seek(edge[1])
    rows = np.frombuffer(f.read(edge[2]), np.float32).reshape(6, 32)
  assert np.all(rows[1:] == 0) and np.any(rows[:1] != 0)
  again = str(tmp_path / "merged_compressed")  # and an output like Orbax's own
  streaming.merge_to_disk(plain, pmeta, ALPHAS, again, compress=True)
  _assert_close(_restored(again), _in_memory(plain, pmeta, ALPHAS))


def test_raw_chunks_need_every_whole_chunk():
  """A chunk missing or of the wrong length is not read as bytes (tensorstore reads it,
  and reports what is wrong with it)."""
  leaf = streaming.Leaf(("w",), (4, 2), np.dtype(np.float32), (2, 2))
  meta = json.dumps({"zarr_format": 2, "compressor": None, "filters": None, "order": "C",
                     "dtype": "<f4", "chunks": [2, 2], "shape": [4, 2]}).encode()
  index = {b"w/.zarray": (None, meta), b"w/0.0": ("f", 0, 16), b"w/1.0": ("f", 16, 16)}
  assert set(streaming.raw_chunks(index, leaf)[0]) == {(0, 0), (1, 0)}
  assert streaming.raw_chunks({**index, b"w/1.0": ("f", 16, 12)}, leaf) is None  # short
  assert streaming.raw_chunks({**index, b"w/1.0": (None, b"\0" * 15)}, leaf) is None
  del index[b"w/1.0"]
  assert streaming.raw_chunks(index, leaf) is None


@pytest.mark.parametrize("ahead", [0, 5])
def test_prefetched_keeps_order_with_inline_items(ahead):
  seen = []
  out = list(streaming.prefetched(lambda x: seen.append(x) or x * x, range(9), depth=2,
                                  inline=lambda x: x % 3 != 0, ahead=ahead))
  assert out == [x * x for x in range(9)] and sorted(seen) == list(range(9))
  taken = []  # inline items are computed when taken, at most `ahead` before they are used
  for x in streaming.prefetched(lambda x: taken.append(x) or x, range(20), depth=1,
                                inline=lambda x: True, ahead=ahead):
    assert max(taken) <= x + max(ahead, 1)


def test_blas_single_threaded_restores_the_thread_count():
  import ctypes
  import glob

  import scipy
  lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir,
                                           "scipy.libs", "libscipy_openblas*"))[0])
  lib.scipy_openblas_set_num_threads(2)
  with streaming.blas_single_threaded():
    assert lib.scipy_openblas_get_num_threads() == 1
  assert lib.scipy_openblas_get_num_threads() == 2


def test_streaming_reads_sharded_checkpoints(micro_pool, tmp_path):
  """Inputs saved from 8 devices are chunked by rows or columns; units follow them."""
  pool, meta = _pool(micro_pool)
  mesh = partitioning.make_mesh(model=8)
  abstract = partitioning.with_shardings(
      meta.abstract, partitioning.param_shardings(meta.abstract, mesh))
  entries = []
  for e in pool.entries[:2]:
    path = str(tmp_path / e.name)
    checkpoints.save(path, checkpoints.restore(e.path, abstract, e.name),
                     {"model": meta.model_config})
    entries.append(pool_manifest.Entry(e.name, path))
  sharded = pool_manifest.make_pool(entries)
  smeta = checkpoints.validate_pool(sharded)
  assert _write_shapes(entries[0].path)["layer_0.down.kernel"] == [8, 32]  # 64 rows / 8
  out = str(tmp_path / "merged")
  streaming.merge_to_disk(sharded, smeta, [0.25, 0.75], out,
                          memory_budget_mb=budget_mb(18 * 128))
  shapes = _write_shapes(out)  # 18 rows of 128 B fit in a unit, 16 are whole chunks
  assert shapes["layer_0.down.kernel"] == [16, 32]
  assert shapes["layer_0.up.kernel"] == [32, 8]  # sharded over columns: the stored chunks
  _assert_close(_restored(out), _in_memory(sharded, smeta, np.float32([0.25, 0.75])))


def test_bfloat16_round_trip(micro_pool, tmp_path):
  pool, meta = _pool(micro_pool)
  entries = []
  for e in pool.entries[:2]:
    params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16),
                          checkpoints.restore(e.path, meta.abstract))
    checkpoints.save(str(tmp_path / e.name), params, {"model": meta.model_config})
    entries.append(pool_manifest.Entry(e.name, str(tmp_path / e.name)))
  bf = pool_manifest.make_pool(entries)
  bmeta = checkpoints.validate_pool(bf)
  out = str(tmp_path / "merged")
  streaming.merge_to_disk(bf, bmeta, [0.5, 0.5], out, memory_budget_mb=budget_mb(2000))
  merged = _restored(out)
  assert jax.tree.leaves(merged)[0].dtype == jax.numpy.bfloat16
  _assert_close(merged, _in_memory(bf, bmeta, np.float32([0.5, 0.5])))


# ----------------------------------------------------------------------------- failures

def _nan_copy(src: str, dst: str, leaf: str, index) -> None:
  shutil.copytree(src, dst)
  store = ts.open(streaming.array_spec(dst, leaf), read=True, write=True).result()
  store[index].write(np.nan).result()


def test_nan_input_is_named_and_nothing_is_written(micro_pool, tmp_path):
  pool, meta = _pool(micro_pool)
  _nan_copy(pool.entries[1].path, str(tmp_path / "bad"), "layer_1.up.kernel", (5, 7))
  bad = pool_manifest.make_pool([pool.entries[0], pool_manifest.Entry("bad", str(tmp_path / "bad")),
                               pool.entries[2]])
  out = str(tmp_path / "out" / "merged")
  with pytest.raises(UserError, match=r"'layer_1/up/kernel' has NaN.*checkpoint 'bad'"):
    streaming.merge_to_disk(bad, meta, ALPHAS, out, memory_budget_mb=budget_mb(1000))
  assert os.listdir(tmp_path / "out") == []  # no output, no temp dir


def test_cli_streaming_merge(micro_pool, tmp_path, capsys):
  out = str(tmp_path / "merged")
  args = ["merge", "--streaming", f"--pool={micro_pool}", "--weights=2,3,5", f"--output={out}"]
  assert cli.main(args) == 0
  pool, meta = _pool(micro_pool)
  _assert_close(_restored(out), _in_memory(pool, meta, ALPHAS))
  assert cli.main(args) == 2  # exists
  assert "already exists" in capsys.readouterr().err
  assert cli.main(args[:-1] + [f"--output={out}", "--overwrite", "--weights=1,0,0"]) == 0
  _assert_close(_restored(out), _in_memory(pool, meta, np.float32([1, 0, 0])))


def test_interrupted_merge_leaves_old_output(micro_pool, tmp_path, monkeypatch):
  pool, meta = _pool(micro_pool)
  out = str(tmp_path / "merged")
  streaming.merge_to_disk(pool, meta, ALPHAS, out)
  before = _snapshot([out])
  stale = f"{out}.partial-deadbeef"  # as a killed writer leaves it
  os.makedirs(stale)
  calls, accumulate = [], streaming.accumulate

  def crash(*a):
    calls.append(1)
    if len(calls) > 10:
      raise KeyboardInterrupt
    return accumulate(*a)
  monkeypatch.setattr(streaming, "accumulate", crash)
  with pytest.raises(KeyboardInterrupt):
    streaming.merge_to_disk(pool, meta, ALPHAS, out, overwrite=True)
  assert _snapshot([out]) == before
  assert sorted(os.listdir(tmp_path)) == ["merged"]  # temp and stale dirs gone


def test_rejects_output_inside_an_input(micro_pool):
  pool, meta = _pool(micro_pool)
  with pytest.raises(UserError, match="overlaps input"):
    streaming.merge_to_disk(pool, meta, ALPHAS, os.path.join(pool.paths[0], "merged"))
