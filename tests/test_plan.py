"""`recycle-jax plan` on pools of header-only Hugging Face folders (config.json and
safetensors headers; the data is a hole), and its memory figure against a real run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from recycle_jax import cli
from recycle_jax.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import header_only_pool  # noqa: E402

SMALL = transformer.ModelConfig(family="llama", vocab_size=512, d_model=128, d_ff=256,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                tie_embeddings=False, dtype="bfloat16")
TASK = "--task=choice:examples=16,choices=2,length=32"


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
  return header_only_pool.write_pool(str(tmp_path_factory.mktemp("pool")), SMALL, 3)


def _plan(capsys, *argv) -> tuple[int, str, str]:
  code = cli.main(["plan", *argv, "--log_level=error"])
  out, err = capsys.readouterr()
  return code, out, err


def test_plan_json_reports_memory_flops_and_fit(small_pool, capsys):
  code, out, err = _plan(capsys, f"--pool={small_pool}", "--mesh=data:2,model:4", TASK,
                         "--device_kind=h100", "--json")
  assert code == 0, err
  rec = json.loads(out)
  for key in ("per_device_bytes", "fits", "flops_per_candidate", "compile_s"):
    assert key in rec
  assert rec["fits"] is True and rec["compile_s"] > 0 and rec["flops_per_candidate"] > 0
  # The arguments hold the pool's shards (exactly what the sharding rules give a device)
  # plus the task's rows and the weights; the total adds the temporaries.
  assert rec["pool_bytes_per_device"] <= rec["argument_bytes"] < rec["pool_bytes_per_device"] * 1.5
  assert rec["per_device_bytes"] > rec["argument_bytes"]
  # 3 trees of ~0.2M bf16 params, most dims split 4 ways over 'model'.
  tree = rec["pool"]["bytes_per_checkpoint"]
  assert 3 * tree / 4 <= rec["pool_bytes_per_device"] < 3 * tree / 2
  assert rec["roofline_s_per_generation"] > 0 and rec["population_size"] == 7


@pytest.mark.slow
def test_vmap_counts_flops_per_candidate_like_map(small_pool, capsys):
  """XLA counts a loop body once: 'map' gives one candidate, 'vmap' P (divided by P)."""
  recs = []
  for mode in ("map", "vmap"):
    code, out, err = _plan(capsys, f"--pool={small_pool}", "--mesh=data:1,model:2",
                           "--devices=2", TASK, f"--mode={mode}", "--json")
    assert code == 0, err
    recs.append(json.loads(out))
  assert recs[1]["flops_per_candidate"] == pytest.approx(recs[0]["flops_per_candidate"],
                                                         rel=0.05)
  assert recs[1]["temp_bytes"] > recs[0]["temp_bytes"]  # P merged copies at once


@pytest.mark.slow
def test_extrapolated_depth_matches_a_full_compile(tmp_path, capsys):
  """The 2-depth extrapolation against compiling every layer of a 6-layer model."""
  import dataclasses
  pool = header_only_pool.write_pool(str(tmp_path), dataclasses.replace(
      SMALL, num_layers=6, layer_types=()), 2)
  recs = {}
  for flag in ("", "--full_depth"):
    code, out, err = _plan(capsys, f"--pool={pool}", "--mesh=data:1,model:1", "--devices=1",
                           TASK, "--json", *([flag] if flag else []))
    assert code == 0, err
    recs[flag] = json.loads(out)
  guess, full = recs[""], recs["--full_depth"]
  assert "extrapolated" in guess["how"] and "full depth" in full["how"]
  assert guess["argument_bytes"] == pytest.approx(full["argument_bytes"], rel=0.01)
  assert guess["per_device_bytes"] == pytest.approx(full["per_device_bytes"], rel=0.15)
  assert guess["flops_per_candidate"] == pytest.approx(full["flops_per_candidate"], rel=0.05)


@pytest.mark.parametrize("argv,words", [
    (["--mesh=data:3,model:4", "--devices=8"], "not the 8 devices"),
    (["--mesh=data:-1,model:3", "--devices=8"], "model:3 does not divide the 8 devices"),
    (["--mesh=data:2,model:4", "--device_kind=v7"], "unknown device kind 'v7'"),
    (["--mesh=rows:2"], "bad mesh axis"),
    (["--mesh=data:2,model:4", "--task=choice:examples=4"], "needs examples and length"),
])
def test_bad_input_is_one_line(small_pool, capsys, argv, words):
  code, out, err = _plan(capsys, f"--pool={small_pool}", *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
  assert out == ""


def test_a_pool_that_does_not_fit_says_by_how_much(tmp_path, capsys):
  """4 x 4.4 GB of bf16 weights on one v5e (16 GiB): the plan is printed, then one line."""
  import dataclasses
  big = dataclasses.replace(SMALL, vocab_size=32000, d_model=8192, d_ff=28672, num_heads=64,
                            num_kv_heads=8)
  pool = header_only_pool.write_pool(str(tmp_path), big, 4)
  code, out, err = _plan(capsys, f"--pool={pool}", "--mesh=data:1,model:1", "--devices=1",
                         TASK, "--device_kind=v5e")
  assert code == 2
  line = err.strip().splitlines()
  assert len(line) == 1 and "does not fit" in line[0] and "GiB more than" in line[0], err
  assert "does NOT fit" in out and "change:" in out


MEASURE = textwrap.dedent("""
  import gc, json, os
  import jax, jax.numpy as jnp, numpy as np
  from recycle_jax import plan
  from recycle_jax.evaluation import scorers
  from recycle_jax.merging import kernels
  from recycle_jax.models import families, transformer
  from recycle_jax.search import population

  def rss(field):
    for line in open("/proc/self/status"):
      if line.startswith(field):
        return int(line.split()[1]) * 1024

  cfg = transformer.ModelConfig(d_model=512, num_layers=4, num_heads=8, num_kv_heads=4,
                                d_ff=1408, vocab_size=4096, tie_embeddings=False)
  n, size = 4, 3
  abstract = families.param_shapes(cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  splits = [plan.synthetic_split(plan.TaskShape("choice", 64, 128, 4), cfg.vocab_size)]
  fig = plan.compile_figures(cfg, abstract, n, mesh, plan._abstract_datas(splits, mesh),
                             size, "map", 0)
  datas = plan.task_data.place(tuple(splits), mesh)
  fn = jax.jit(population.make_population_fn(
      scorers.make_scorer(transformer.Decoder(cfg), "teacher_forced", 0), "map",
      kernels.linear))
  points = jnp.full((size, n), 1 / n, jnp.float32)
  program = fn.lower(points, tuple(plan._sharded(abstract, mesh) for _ in range(n)),
                     datas).compile()
  gc.collect()
  base = rss("VmRSS")
  pool = tuple(jax.tree.map(lambda x: jnp.asarray(np.ones(x.shape, x.dtype)), abstract)
               for _ in range(n))
  jax.block_until_ready(pool)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark starts again from here
  jax.block_until_ready(program(points, pool, datas))
  print(json.dumps({"plan": fig.total_bytes, "plan_args": fig.argument_bytes,
                    "measured": rss("VmHWM") - base}))
""")


@pytest.mark.slow
def test_plan_memory_against_the_measured_peak():
  """Plan's per-device bytes against the process's peak RSS running the same program on
  one CPU device (pool placed, then one execution): XLA's CPU runtime keeps its buffers in
  host memory. The measured peak also holds allocator and runtime overhead (the first
  execution's): on this machine it was 1.38x plan's figure."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rec["plan"] > 2 * rec["plan_args"]  # temporaries (logits, the merge) dominate
  assert 0.8 <= rec["measured"] / rec["plan"] <= 1.7, rec
