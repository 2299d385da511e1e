"""Merge throughput and memory, in one run (about 60 s on 2 CPU cores).

  (a) in-memory merge: N checkpoints sharded over 8 fake CPU devices by the partitioning
      rules (parameter dims, never the pool axis), one jitted `kernels.linear`, against a
      numpy copy of the same input bytes.                                  goal >= 0.7
  (b) streaming merge (`streaming.merge_to_disk`) of the same kind of pool saved to disk,
      against reading the checkpoints' files raw, with the page cache warm for both (each
      timing is the median of 5 after a warm-up run; the merge also writes and fsyncs its
      output, and is timed again without the fsync: `merge --no_fsync`), and cold: the
      pool's files evicted from the page cache before each run (posix_fadvise DONTNEED),
      so both read from the disk, as a pool larger than memory is.       goal >= 0.5
      Also against reading the arrays with tensorstore without merging (zstd decode):
      the floor for anything reading Orbax's compressed format; and all again on the pool
      saved without compression, whose chunks the merge sums straight from the files'
      mapped pages.
  (c) peak RSS of the streaming merge for N = 2, 4, 8, 16 at one model size, each in a
      fresh process (VmHWM: ru_maxrss would report the parent's peak, see peak_rss_bytes),
      next to a process that only imports and reads metadata; for both pools (mapped
      pages count as resident until the merge drops them).

  .venv/bin/python benchmarks/merge_throughput.py [--size_mb 40] [--budget_mb 16]
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.merging import kernels, streaming
from recycle_jax.models import partitioning  # noqa: E402

MB = 2**20


def fake_params(size_mb: float, seed: int) -> dict:
  """A decoder-shaped float32 tree of about `size_mb`, named so the default rules shard
  it (q/k/v/up over columns, o/down over rows, the embedding over columns)."""
  d = 512
  layers = max(1, round((size_mb - 8) / 16))  # 16 MB a layer + an 8 MB embedding
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32) * 0.02  # noqa: E731
  tree = {"embed": {"embedding": normal(4096, d)}, "final_norm": {"scale": np.ones(d, np.float32)}}
  for i in range(layers):
    tree[f"layer_{i}"] = {
        "attn": {k: {"kernel": normal(d, d)} for k in ("q", "k", "v", "o")},
        **{k: {"kernel": normal(d, 4 * d)} for k in ("gate", "up")},
        "down": {"kernel": normal(4 * d, d)}}
  return tree


def median_time(fn, repeat: int = 5, setup=lambda: None) -> float:
  """Median wall time of fn() after a warm-up run (compilation, page cache); `setup` runs
  untimed before each call (e.g. removing the previous output)."""
  setup()
  fn()
  times = []
  for _ in range(repeat):
    setup()
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def shardings_for(tree):
  return partitioning.param_shardings(tree, partitioning.make_mesh(model=8))


# ----------------------------------------------------------------------------- (a)

def bench_in_memory(n: int, size_mb: float) -> dict:
  trees = [fake_params(size_mb, seed) for seed in range(n)]
  shardings = shardings_for(trees[0])
  pool = tuple(jax.device_put(t, shardings) for t in trees)
  nbytes = sum(x.nbytes for t in trees for x in jax.tree.leaves(t))
  del trees
  alphas = np.full(n, 1.0 / n, np.float32)
  merge = jax.jit(kernels.linear)
  t_merge = median_time(lambda: jax.block_until_ready(merge(alphas, pool)))
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  t_copy = median_time(lambda: np.copyto(dst, src))
  return {"bytes": nbytes, "merge_s": t_merge, "copy_s": t_copy, "ratio": t_copy / t_merge}


# ----------------------------------------------------------------------------- (b)

def write_pool(workdir: str, n: int, size_mb: float, compress: bool = True) -> str:
  """N checkpoints saved from 8 devices (chunked like a sharded run writes them); Orbax's
  default zstd compression, or none."""
  workdir = os.path.join(workdir, "pool" if compress else "pool_uncompressed")
  entries = []
  for seed in range(n):
    tree = fake_params(size_mb, seed)
    tree = jax.device_put(tree, shardings_for(tree))
    path = os.path.join(workdir, f"ckpt_{seed}")
    if compress:
      checkpoints.save(path, tree, {"model": None})
    else:
      handler = ocp.PyTreeCheckpointHandler(use_compression=False)
      ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(tree),
                                     custom_metadata={checkpoint_meta.META_KEY: {"model": None}})
    entries.append(pool_manifest.Entry(f"ckpt_{seed}", path))
  manifest = os.path.join(workdir, "pool.json")
  pool_manifest.write_manifest(manifest, pool_manifest.make_pool(entries))
  return manifest


def read_raw(paths, buf=bytearray(16 * MB)) -> int:
  """Reads every file of the checkpoints; bytes read."""
  total, view = 0, memoryview(buf)
  for top in paths:
    for root, _, files in os.walk(top):
      for name in files:
        with open(os.path.join(root, name), "rb", buffering=0) as f:
          while (k := f.readinto(view)):
            total += k
  return total


def read_arrays(pool: pool_manifest.Pool, meta) -> int:
  """Reads every array of every checkpoint with tensorstore (decoded, not merged)."""
  import tensorstore as ts
  leaves, ctx, total = streaming.leaves_of(meta.abstract, {}), ts.Context(), 0
  for e in pool.entries:
    for leaf in leaves:
      total += ts.open(streaming.array_spec(e.path, leaf.name), read=True,
                       context=ctx).result().read().result().nbytes
  return total


def evict(paths) -> None:
  """Drops the checkpoints' files from the page cache (once clean; no root needed)."""
  os.sync()
  for top in paths:
    streaming.drop_cached(top)


def pool_of(manifest: str, n: int) -> pool_manifest.Pool:
  return pool_manifest.make_pool(pool_manifest.read_manifest(manifest).entries[:n])


def bench_streaming(manifest: str, n: int, budget_mb: float, workdir: str) -> dict:
  pool = pool_of(manifest, n)
  meta = checkpoints.validate_pool(pool)
  out = os.path.join(workdir, "merged")

  stats = {}

  def merge(fsync: bool):
    stats.update(streaming.merge_to_disk(pool, meta, np.full(n, 1.0 / n), out,
                                         memory_budget_mb=budget_mb, progress=False,
                                         fsync=fsync))
  clear = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
  cold = lambda: (clear(), evict(pool.paths))  # noqa: E731
  t_raw = median_time(lambda: read_raw(pool.paths))
  t_decode = median_time(lambda: read_arrays(pool, meta))
  t_stream = median_time(lambda: merge(True), setup=clear)
  t_nosync = median_time(lambda: merge(False), setup=clear)
  t_cold_raw = median_time(lambda: read_raw(pool.paths), setup=cold)
  t_cold = median_time(lambda: merge(True), setup=cold)
  clear()
  return {"file_bytes": read_raw(pool.paths), "param_bytes": read_arrays(pool, meta),
          "raw_s": t_raw, "decode_s": t_decode, "stream_s": t_stream, "nosync_s": t_nosync,
          "ratio": t_raw / t_stream, "nosync_ratio": t_raw / t_nosync,
          "decode_ratio": t_decode / t_stream, "cold_raw_s": t_cold_raw, "cold_s": t_cold,
          "cold_ratio": t_cold_raw / t_cold,
          "path": ("mapped pages" if streaming.MAPPED else "pread")
                  if "tensorstore" not in stats else "tensorstore"}


# ----------------------------------------------------------------------------- (c)

def rss_child(manifest: str, n: int, budget_mb: float, out: str) -> None:
  """Runs in a fresh process: merges the first n (0: metadata only); prints peak RSS."""
  pool = pool_of(manifest, max(n, 1))
  meta = checkpoints.validate_pool(pool)
  if n:
    streaming.merge_to_disk(pool, meta, np.full(n, 1.0 / n), out, memory_budget_mb=budget_mb,
                            progress=False)
    shutil.rmtree(out)
  print(peak_rss_bytes())


def peak_rss_bytes() -> int:
  """This process's peak RSS. ru_maxrss (KiB on Linux) survives fork + exec, so a child of
  a large parent reports the parent's peak; VmHWM belongs to this process's memory only."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(manifest: str, n: int, budget_mb: float, workdir: str) -> int:
  cmd = [sys.executable, os.path.abspath(__file__), "--rss_child", str(n), "--manifest",
         manifest, "--budget_mb", str(budget_mb), "--workdir", workdir]
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return int(res.stdout.split()[-1])


# ----------------------------------------------------------------------------- main

def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size_mb", type=float, default=40.0, help="one checkpoint's float32 size")
  p.add_argument("--n", type=int, default=8, help="pool size for (a) and (b)")
  p.add_argument("--rss_ns", default="2,4,8,16")
  p.add_argument("--budget_mb", type=float, default=16.0, help="streaming memory budget")
  p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
  p.add_argument("--rss_child", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.rss_child is not None:
    return rss_child(args.manifest, args.rss_child, args.budget_mb,
                     os.path.join(args.workdir, f"rss_{args.rss_child}"))

  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  ns = [int(x) for x in args.rss_ns.split(",")]
  workdir = tempfile.mkdtemp(prefix="merge_bench_", dir=args.workdir)
  t0 = time.time()
  try:
    print(f"host: {os.cpu_count()} CPU cores, jax {jax.__version__}, 8 fake CPU devices; "
          f"checkpoints of {args.size_mb:g} MB float32")
    a = bench_in_memory(args.n, args.size_mb)
    print(f"(a) in-memory sharded merge, N={args.n}: {a['bytes'] / MB:.0f} MB in "
          f"{a['merge_s'] * 1e3:.1f} ms ({a['bytes'] / a['merge_s'] / 1e9:.2f} GB/s); numpy "
          f"copy of the same bytes {a['copy_s'] * 1e3:.1f} ms -> ratio {a['ratio']:.2f} "
          f"(goal >= 0.7)")
    manifests = {True: write_pool(workdir, max(ns + [args.n]), args.size_mb),
                 False: write_pool(workdir, max(ns + [args.n]), args.size_mb, False)}
    for compress, pool in manifests.items():
      b = bench_streaming(pool, args.n, args.budget_mb, workdir)
      print(f"(b) streaming merge, N={args.n}, budget {args.budget_mb:g} MB, pool saved "
            f"{'with zstd (Orbax default)' if compress else 'uncompressed'}: "
            f"{b['param_bytes'] / MB:.0f} MB of parameters ({b['file_bytes'] / MB:.0f} MB of "
            f"files), read with {b['path']}:\n"
            f"    page cache warm: merge {b['stream_s']:.3f} s "
            f"({b['param_bytes'] / b['stream_s'] / 1e9:.2f} GB/s); raw file read "
            f"{b['raw_s']:.3f} s -> ratio {b['ratio']:.2f} (goal >= 0.5); without the "
            f"output's fsync {b['nosync_s']:.3f} s -> ratio {b['nosync_ratio']:.2f}; reading "
            f"the arrays alone (tensorstore, no merge) {b['decode_s']:.3f} s -> ratio "
            f"{b['decode_ratio']:.2f}\n"
            f"    cold (from disk): merge {b['cold_s']:.3f} s; raw file read "
            f"{b['cold_raw_s']:.3f} s -> ratio {b['cold_ratio']:.2f} (goal >= 0.5)")
    for compress, manifest in manifests.items():
      base = peak_rss(manifest, 0, args.budget_mb, workdir)
      print(f"(c) streaming peak RSS, budget {args.budget_mb:g} MB, {args.size_mb:g} MB "
            f"checkpoints {'with zstd' if compress else 'uncompressed (mapped reads)'}: "
            f"baseline (imports + metadata) {base / MB:.0f} MB")
      for n in ns:
        rss = peak_rss(manifest, n, args.budget_mb, workdir)
        print(f"    N={n:2d}: peak {rss / MB:.0f} MB = baseline + {(rss - base) / MB:.0f} MB "
              f"({(rss - base) / MB / args.budget_mb:.1f}x budget; pool {n * args.size_mb:g} MB)")
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
