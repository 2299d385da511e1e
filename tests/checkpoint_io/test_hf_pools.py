"""Pools as they come: Hugging Face folders read in place (headers validated, each
device's slices read from the mapped files), merged, and written back as complete
Hugging Face folders that transformers loads and whose `generate` stops at EOS; and any
Orbax tree (no recycle_jax metadata) merged."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import hf_reader
from recycle_jax import placed_pool
from recycle_jax import cli
from recycle_jax.models import families, partitioning
from recycle_jax.checkpoint_io import hf_folder, tokenizer_files
from recycle_jax.merging import hf_linear, hf_merge

import hf_fixtures  # noqa: E402

import torch  # noqa: E402 (pinned test dependency)
import transformers  # noqa: E402 (pinned test dependency)
EOS = 2


def _nudge(model):
  """Every member predicts EOS next whatever the input (a positive first coordinate in
  every embedding, read only by EOS's output row), so `generate` must stop at once."""
  with torch.no_grad():
    model.model.embed_tokens.weight[:, 0] = 1.0
    model.model.norm.weight[:] = 1.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[EOS, 0] = 50.0
  return model


@pytest.fixture(scope="module")
def hf_pool(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_pool")
  tok = hf_fixtures.train_bpe(root / "tok")
  entries = []
  for i in range(3):
    d = root / f"m{i}"
    model = _nudge(hf_fixtures.tiny_llama(d, len(tok), seed=i, max_positions=320))
    shutil.rmtree(d)  # member 1 sharded (an index and several files), as large ones come
    model.save_pretrained(d, max_shard_size="40KB" if i == 1 else "5GB")
    tok.save_pretrained(d)
    entries.append({"name": f"m{i}", "path": f"m{i}"})
  (root / "pool.json").write_text(json.dumps({"checkpoints": entries}))
  return root


def test_folders_validate_from_headers_and_restore_sharded_slices(hf_pool, monkeypatch):
  assert os.path.isfile(hf_pool / "m1" / hf_reader.HF_INDEX)
  pool = pool_manifest.load_pool(str(hf_pool / "pool.json"))
  calls = []
  for fn in ("memmap", "read_slice"):
    monkeypatch.setattr(hf_folder, fn, lambda *a: calls.append(a) or
                        (_ for _ in ()).throw(AssertionError("tensor read")))
  meta = checkpoints.validate_pool(pool)  # headers alone: no tensor read
  assert meta.model_config["family"] == "llama" and not calls
  assert meta.tokenizer == tokenizer_files.from_folder(str(hf_pool / "tok"))
  monkeypatch.undo()
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  spec = lambda x: P("a", "b") if x.ndim == 2 and x.shape[0] % 4 == 0 and \
      x.shape[1] % 2 == 0 else P()  # noqa: E731  (a transposed kernel split both ways)
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), meta.abstract)
  abstract = partitioning.with_shardings(meta.abstract, shardings)
  read = []
  real = hf_folder.read_slice
  monkeypatch.setattr(hf_folder, "read_slice", lambda *a: read.append(a) or real(*a))
  params = checkpoints.restore(pool.entries[1].path, abstract)
  _, want, _ = hf_reader.load_hf(pool.entries[1].path)
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    ref = families.get_path(want, tuple(k.key for k in path))
    np.testing.assert_array_equal(np.asarray(x), ref)
    assert x.sharding == families.get_path(shardings, tuple(k.key for k in path))
  # Sharded parameters were read slice by slice (one read per distinct device slice).
  sharded = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
  assert sharded and len(read) > len(jax.tree.leaves(params))


def test_merge_hf_pool_to_hf_folder_loads_in_transformers(hf_pool, tmp_path, monkeypatch):
  out = tmp_path / "merged"
  assert cli.main(["merge", f"--pool={hf_pool / 'pool.json'}", "--weights=0.5,0.3,0.2",
                   f"--output={out}", "--format=hf"]) == 0
  files = sorted(os.listdir(out))
  for f in ("config.json", "generation_config.json", hf_reader.HF_WEIGHTS, "tokenizer.json",
            "tokenizer_config.json"):
    assert f in files
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
  cfg = json.loads((out / "config.json").read_text())
  src = json.loads((hf_pool / "m0" / "config.json").read_text())
  for k in ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert cfg[k] == src[k], k
  assert cfg["rope_parameters"]["rope_theta"] == src["rope_parameters"]["rope_theta"] == 500
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["eos_token_id"] == EOS
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  members = [transformers.AutoModelForCausalLM.from_pretrained(hf_pool / f"m{i}")
             for i in range(3)]
  sd = {k: sum(w * m.state_dict()[k] for w, m in zip((0.5, 0.3, 0.2), members))
        for k in members[0].state_dict()}
  for k, v in model.state_dict().items():
    np.testing.assert_allclose(v.numpy(), sd[k].numpy(), atol=1e-6)
  # The streaming merge reads the folders too, and writes the same folder.
  assert cli.main(["merge", f"--pool={hf_pool / 'pool.json'}", "--weights=0.5,0.3,0.2",
                   f"--output={tmp_path / 'streamed'}", "--format=hf", "--streaming"]) == 0
  # Units of 100 elements: several per tensor, cut anywhere, on threads; same folder.
  monkeypatch.setattr(hf_linear, "UNIT", 100)
  hf_merge.merge_pool(pool_manifest.load_pool(str(hf_pool / "pool.json")), (0.5, 0.3, 0.2),
                      str(tmp_path / "blocks"))
  blocks = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "blocks")
  for k, v in blocks.state_dict().items():
    np.testing.assert_allclose(v.numpy(), model.state_dict()[k].numpy(), atol=1e-6)
  streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
  for k, v in streamed.state_dict().items():
    np.testing.assert_allclose(v.numpy(), model.state_dict()[k].numpy(), atol=1e-6)
  assert sorted(os.listdir(tmp_path / "streamed")) == files
  # Large merges are sharded, with an index.
  loaded = placed_pool.place(str(hf_pool / "pool.json"))
  hf_folder.save_folder(str(tmp_path / "sharded"), loaded.model_cfg, loaded.params[0],
                    loaded.source_config, loaded.tokenizer, shard_bytes=20_000)
  assert os.path.isfile(tmp_path / "sharded" / hf_reader.HF_INDEX)
  sharded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
  for k, v in sharded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), members[0].state_dict()[k].numpy())
  ids = tok("the cat sat", return_tensors="pt")
  gen_out = model.generate(**ids, max_new_tokens=12, do_sample=False)
  assert gen_out.shape[1] == ids["input_ids"].shape[1] + 1 and gen_out[0, -1] == EOS


def test_merge_convert_inspect_import_neither_tensorflow_nor_seqio(hf_pool, tmp_path):
  """Every non-evaluating command on real pools (Hugging Face folders and the Orbax
  checkpoints converted from them), run one after another in a fresh process (this one
  may have imported them for other tests): TensorFlow and seqio are never imported, and
  orbax not before an Orbax checkpoint is read."""
  import subprocess
  import sys
  hf, orbax, out = str(hf_pool / "pool.json"), tmp_path / "orbax.json", tmp_path / "out"
  orbax.write_text(json.dumps({"checkpoints": [
      {"name": f"o{i}", "path": str(out / f"o{i}")} for i in range(2)]}))
  cfg = tmp_path / "merge.yml"
  cfg.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [
      {"model": str(hf_pool / m), "parameters": {"weight": 0.5}} for m in ("m0", "m1")]}))
  runs = [["merge", f"--pool={tmp_path / 'missing.json'}", f"--output={out / 'x'}"],
          ["merge", f"--config={cfg}", f"--output={out / 'config'}"],
          ["merge", f"--pool={hf}", f"--output={out / 'hf_streamed'}", "--streaming",
           "--format=hf"],
          ["inspect", hf],
          *(["convert", str(hf_pool / f"m{i}"), str(out / f"o{i}")] for i in range(2)),
          ["convert", str(out / "o0"), str(out / "o0_hf")],
          ["inspect", str(orbax)],
          ["merge", f"--pool={orbax}", f"--output={out / 'orbax'}"],
          ["merge", f"--pool={orbax}", f"--output={out / 'orbax_streamed'}", "--streaming"],
          ["merge", f"--pool={hf}", f"--output={out / 'hf'}", "--format=hf"]]
  probe = ("import json, sys; from recycle_jax import cli\n"
           "for argv in json.loads(sys.argv[1]):\n"
           "  rc = cli.main(argv)\n"
           "  print(json.dumps([rc, [m for m in ('tensorflow', 'seqio', 'orbax.checkpoint') "
           "if m in sys.modules]]))")
  proc = subprocess.run([sys.executable, "-c", probe, json.dumps(runs)], capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
  got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
  assert len(got) == len(runs), proc.stdout + proc.stderr
  assert [rc for rc, _ in got] == [2] + [0] * (len(runs) - 1), proc.stdout + proc.stderr
  assert [heavy for _, heavy in got[:4]] == [[]] * 4  # Hugging Face folders: no orbax
  assert all(heavy in ([], ["orbax.checkpoint"]) for _, heavy in got), got
  for name in ("config", "hf_streamed", "o0_hf", "hf"):
    assert os.path.isfile(out / name / "tokenizer.json"), name  # the tokenizer travelled
  for name in ("orbax", "orbax_streamed"):
    assert tokenizer_files.of_checkpoint(str(out / name), checkpoints.read_metadata(
        str(out / name)).custom) == tokenizer_files.from_folder(str(hf_pool / "tok"))


def test_bad_folders_one_line_each(hf_pool, tmp_path, capsys):
  def refused(pool_dir, pattern):
    out = tmp_path / "never"
    rc = cli.main(["merge", f"--pool={pool_dir / 'pool.json'}", f"--output={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert pattern in err[0], err[0]
    assert not out.exists() and not list(tmp_path.glob("never.partial-*"))

  def pool_of(name, *members):
    d = tmp_path / name
    d.mkdir()
    for m in members:
      shutil.copytree(hf_pool / m, d / m)
    (d / "pool.json").write_text(json.dumps(
        {"checkpoints": [{"name": m, "path": m} for m in members]}))
    return d

  d = pool_of("pickled", "m0", "m2")  # pickled weights only: refused, never loaded
  os.remove(d / "m2" / "model.safetensors")
  (d / "m2" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  refused(d, "weights are pickled (pytorch_model.bin)")
  d = pool_of("shape", "m0", "m2")  # config.json disagreeing with a tensor
  cfg = json.loads((d / "m2" / "config.json").read_text())
  (d / "m2" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
  refused(d, "'model.layers.0.mlp.gate_proj.weight' has shape (48, 32), config.json "
          "implies (64, 32)")
  d = pool_of("truncated", "m0", "m2")
  f = d / "m2" / "model.safetensors"
  f.write_bytes(f.read_bytes()[:os.path.getsize(f) // 2])
  refused(d, "truncated")
  d = pool_of("family", "m0", "m2")  # a Mistral member in a Llama pool
  cfg = json.loads((d / "m2" / "config.json").read_text())
  (d / "m2" / "config.json").write_text(json.dumps(
      {**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
       "sliding_window": None}))
  refused(d, "checkpoint 'm2' is a mistral model but 'm0' is a llama model")
  d = pool_of("tok", "m0", "m2")  # another tokenizer
  hf_fixtures.train_bpe(d / "m2", text=hf_fixtures.TEXT.upper())
  refused(d, "checkpoint 'm2' has a different tokenizer")


def test_any_orbax_tree_merges_without_metadata(tmp_path, capsys):
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(0)
  trees = [{"decoder": {"layers": {"mlp": {"wi": rng.normal(size=(4, 16, 8)).astype(np.float32),
                                           "wo": rng.normal(size=(4, 8, 16)).astype(np.float32)}},
                        "decoder_norm": {"scale": rng.normal(size=(16,)).astype(np.float32)}},
            "token_embedder": {"embedding": rng.normal(size=(32, 16)).astype(np.float32)}}
           for _ in range(2)]
  for i, t in enumerate(trees):  # a MaxText-like tree, plain Orbax, no custom metadata
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(tmp_path / f"t{i}"), t)
    ckptr.wait_until_finished()
  (tmp_path / "pool.json").write_text(json.dumps(
      {"checkpoints": [{"name": f"t{i}", "path": f"t{i}"} for i in range(2)]}))
  want = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, *trees)
  for extra in ([], ["--streaming"]):
    out = tmp_path / f"merged{len(extra)}"
    assert cli.main(["merge", f"--pool={tmp_path / 'pool.json'}", "--weights=0.25,0.75",
                     f"--output={out}", *extra]) == 0
    got, _ = checkpoints.restore_local(str(out))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)
  # Only evaluation needs a model family: one line.
  capsys.readouterr()
  rc = cli.main(["eval", f"--checkpoint={tmp_path / 'merged0'}", "--tasks=rj_code"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "has no model family" in err[0], err
  rc = cli.main(["search", f"--workdir={tmp_path / 'run'}",
                 f"--gin_bindings=Experiment.pool={str(tmp_path / 'pool.json')!r}",
                 "--gin_bindings=Experiment.tasks=['rj_code']"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "has no model family" in err[0], err
  assert not (tmp_path / "run").exists()
