"""make-pool: one shared base, then N checkpoints from distinct fine-tuning recipes.

A recipe is a name and a list of stages; a stage trains on a data mixture with an
objective ('sft' or 'dpo') and its own hyperparameters:

  {"name": "sft_code", "stages": [{"mix": {"rj_code": 1.0}, "objective": "sft",
                                   "steps": 60, "lr": 1e-3, "warmup": 5}]}

Mixture sources: 'text' (real code: Python's standard library source), 'facts' (the
generated world's fact sentences, the only place rj_knowledge's answers appear) and the
train split of any held-in task. Evaluation splits never enter training. The pool is
cached: a second call with the same config and seed reuses what is on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from typing import Any, Iterator, Sequence

import gin
import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.runtime import outputs
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.evaluation import task_data, task_splits
from recycle_jax.evaluation import scorers
from recycle_jax.reporting import records
from recycle_jax.models import transformer, training
from recycle_jax.tasks import embedded
from recycle_jax.checkpoint_io import tokenizer_files
from recycle_jax.evaluation import vocabularies
from recycle_jax.runtime.errors import check
from recycle_jax.tasks import builtin

PyTree = Any


# ----------------------------------------------------------------------------- data

def _encode(text: str) -> list[int]:
  return transformer.VOCAB.encode(text)


def sft_arrays(pairs: Sequence[tuple[str, str]], length: int) -> dict[str, np.ndarray]:
  """(prompt, target) pairs -> tokens/mask [n, length]; loss on target + EOS only."""
  toks = np.zeros((len(pairs), length), np.int32)
  mask = np.zeros((len(pairs), length), np.float32)
  for i, (p, t) in enumerate(pairs):
    p, t = _encode(p), _encode(t) + [transformer.EOS_ID]
    seq = (p + t)[:length]
    toks[i, :len(seq)] = seq
    mask[i, len(p):len(seq)] = 1.0
  return {"tokens": toks, "mask": mask}


@gin.configurable
def text_corpus(max_code_bytes: int = 400_000) -> np.ndarray:
  """Real code as one token stream: Python's standard library source."""
  return np.asarray(_encode(embedded.stdlib_code(max_code_bytes)), np.int32)


def facts_corpus(repeats: int = 64, seed: int = 0) -> np.ndarray:
  """The world's facts as one token stream: `repeats` shuffled passes over every fact."""
  facts, rng = embedded.fact_sentences(), np.random.default_rng(seed)
  return np.asarray(_encode(" ".join(facts[i] for _ in range(repeats)
                                     for i in rng.permutation(len(facts)))), np.int32)


STREAMS = {"text": text_corpus, "facts": facts_corpus}


class Sampler:
  """Batches from a weighted mixture of sources, deterministic for a seed."""

  def __init__(self, mix: dict[str, float], length: int, batch: int, seed: int,
               objective: str = "sft"):
    self.length, self.batch, self.objective = length, batch, objective
    self.rng = np.random.default_rng(seed)
    self.names = list(mix)
    w = np.asarray([mix[k] for k in self.names], np.float64)
    self.probs = w / w.sum()
    self.sources = {k: self._source(k) for k in self.names}

  def _source(self, name: str):
    if name in STREAMS:
      check(self.objective == "sft", f"the {name!r} source supports only sft", name)
      return _stream(name)
    check(name in embedded.HELD_IN, f"unknown training source {name!r}", "pool recipe mix",
          f"use 'text', 'facts' or one of {embedded.HELD_IN} (held-out tasks are never trained on)")
    rows = embedded.items(name)["train"]
    pairs = [(r["inputs"], r["targets"]) for r in rows]
    if self.objective == "sft":
      return sft_arrays(pairs, self.length)
    # Preference pairs: the right answer over another example's answer to the same prompt.
    rng = np.random.default_rng(len(name))
    wrong = [_rejected(rows, i, rng) for i in range(len(rows))]
    chosen = sft_arrays(pairs, self.length)
    rejected = sft_arrays([(p, w) for (p, _), w in zip(pairs, wrong)], self.length)
    return {"chosen": chosen["tokens"], "chosen_mask": chosen["mask"],
            "rejected": rejected["tokens"], "rejected_mask": rejected["mask"]}

  def _rows(self, name: str, n: int) -> dict[str, np.ndarray]:
    src = self.sources[name]
    if isinstance(src, np.ndarray):  # token stream: random windows, loss everywhere
      starts = self.rng.integers(0, len(src) - self.length, n)
      toks = np.stack([src[s:s + self.length] for s in starts])
      return {"tokens": toks, "mask": np.ones_like(toks, np.float32)}
    idx = self.rng.integers(0, len(next(iter(src.values()))), n)
    return {k: v[idx] for k, v in src.items()}

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    counts = self.rng.multinomial(self.batch, self.probs)
    parts = [self._rows(k, c) for k, c in zip(self.names, counts) if c > 0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


_STREAMS: dict = {}


def _stream(name: str) -> np.ndarray:
  if name not in _STREAMS:
    _STREAMS[name] = STREAMS[name]()
  return _STREAMS[name]


def _rejected(rows, i: int, rng) -> str:
  if "choices" in rows[i]:
    return rng.choice([c for c in rows[i]["choices"] if c != rows[i]["targets"]])
  for _ in range(10):
    other = rows[int(rng.integers(len(rows)))]["targets"]
    if other != rows[i]["targets"]:
      return other
  return rows[i]["targets"] + "x"


# ----------------------------------------------------------------------------- pool

def _stage_config(stage: dict, batch: int) -> training.TrainConfig:
  return training.TrainConfig(
      steps=int(stage["steps"]), batch_size=batch, learning_rate=float(stage["lr"]),
      warmup_steps=int(stage.get("warmup", 10)), objective=stage.get("objective", "sft"),
      dpo_beta=float(stage.get("beta", 0.1)),
      dpo_sft_weight=float(stage.get("sft_weight", 0.0)))


def train_recipe(apply, params: PyTree, stages: Sequence[dict], length: int, batch: int,
                 seed: int, desc: str) -> PyTree:
  for i, stage in enumerate(stages):
    cfg = _stage_config(stage, batch)
    sampler = Sampler(stage["mix"], length, batch, seed + 1000 * i, cfg.objective)
    params, loss = training.train(apply, params, sampler, cfg,
                                  ref_params=params if cfg.objective == "dpo" else None,
                                  desc=f"{desc} stage {i + 1}")
    logging.info("%s stage %d: final loss %.4f", desc, i + 1, loss)
  return params


def _fingerprint(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@gin.configurable
def make_pool(workdir: str, recipes: Sequence[dict] = gin.REQUIRED,
              base_stages: Sequence[dict] = gin.REQUIRED,
              model: transformer.ModelConfig | None = None, seq_len: int = 96,
              batch_size: int = 32, seed: int = 0, eval_tasks: Sequence[str] | None = None,
              max_eval_examples: int | None = None, progress: bool = True) -> str:
  """Builds (or reuses) the pool; returns the manifest path `workdir/pool.json`."""
  model = model or transformer.ModelConfig()
  eval_tasks = tuple(eval_tasks or embedded.HELD_IN + embedded.HELD_OUT)
  for t in eval_tasks:
    task_splits.get_task(t)
  names = [r["name"] for r in recipes]
  check(len(set(names)) == len(names), "duplicate recipe names", "make_pool.recipes")
  spec = {"model": model.to_dict(), "seq_len": seq_len, "batch": batch_size, "seed": seed,
          "base": list(base_stages)}
  manifest = os.path.join(workdir, "pool.json")
  os.makedirs(workdir, exist_ok=True)
  apply = transformer.Decoder(model).apply
  custom = lambda extra: {"model": model.to_dict(), **extra,
                          "vocabulary": tokenizer_files.BYTE.describe()}

  t0 = time.time()
  base_dir = os.path.join(workdir, "base")
  base_fp = _fingerprint(spec)
  params = _cached(base_dir, base_fp)
  built = params is None
  if params is None:
    params = transformer.init_params(model, jax.random.key(seed))
    params = train_recipe(apply, params, base_stages, seq_len, batch_size, seed, "base")
    checkpoints.save(base_dir, params, custom({"fingerprint": base_fp, "recipe": "base"}),
                     overwrite=True)
  base = params
  entries = []
  bar = tqdm(recipes, desc="pool", disable=not progress)
  for i, recipe in enumerate(bar):
    path = os.path.join(workdir, "checkpoints", recipe["name"])
    fp = _fingerprint({**spec, "recipe": recipe, "index": i})
    if _cached(path, fp, restore=False) is None:
      built = True
      params = train_recipe(apply, base, recipe["stages"], seq_len, batch_size,
                            seed + 17 * (i + 1), recipe["name"])
      checkpoints.save(path, params, custom({"fingerprint": fp, "recipe": recipe}),
                       overwrite=True)
    entries.append(pool_manifest.Entry(recipe["name"], path, {"recipe": recipe}))
  train_s = time.time() - t0

  pool = pool_manifest.make_pool(entries, manifest)
  old = _old_scores(manifest, eval_tasks, max_eval_examples)
  scores = {e.name: old[e.name] for e in entries if e.name in old}
  if len(scores) < len(entries):
    built = True
    scores = score_pool(pool, eval_tasks, max_eval_examples)
  entries = [pool_manifest.Entry(e.name, e.path, {**e.info, "scores": scores[e.name]})
             for e in entries]
  pool_manifest.write_manifest(manifest, pool_manifest.make_pool(entries, manifest))
  timing = {"train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
            "built_on": build_environment()}
  timing = write_pool_meta(workdir, eval_tasks, max_eval_examples, timing, built)
  write_pool_report(workdir, entries, eval_tasks, timing)
  return manifest


def write_pool_meta(workdir: str, eval_tasks: Sequence[str], max_eval_examples: int | None,
                    timing: dict, built: bool) -> dict:
  """workdir/pool_meta.json; returns the timing it holds (a cache hit keeps the cold
  build's)."""
  meta_path = os.path.join(workdir, "pool_meta.json")
  if os.path.exists(meta_path) and not built:
    old_meta = json.load(open(meta_path))
    timing = {k: old_meta.get(k, v) for k, v in timing.items()}
  with open(meta_path, "w") as f:
    json.dump({"eval_tasks": list(eval_tasks), "max_eval_examples": max_eval_examples,
               "scoring": scoring_key(eval_tasks), **timing}, f, indent=1)
  return timing


def build_environment() -> dict:
  """What a pool's numbers depend on beyond its config: XLA:CPU's float results depend on
  the processor and the thread count, and training amplifies the last-bit differences, so
  the same seed on another CPU model builds a different (equally valid) pool. Recorded
  with every cold build."""
  cpu, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          cpu = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
        if cpu and flags:
          break
  except OSError:
    pass
  isa = next((i for i in ("avx512f", "avx2", "avx", "neon", "asimd") if i in flags), "")
  return {"cpu": cpu, "vector_isa": isa, "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def write_pool_report(workdir: str, entries, eval_tasks: Sequence[str], timing=None) -> None:
  held_in = [t for t in eval_tasks if t not in embedded.HELD_OUT]
  held_out = [t for t in eval_tasks if t in embedded.HELD_OUT]
  cols = held_in + held_out
  grid = lambda split: np.array([[e.info["scores"][split][t] for t in cols] for e in entries])
  text = records.pool_report_markdown([e.name for e in entries], held_in, held_out,
                                        grid("dev"), grid("test"),
                                        [e.info["recipe"] for e in entries], timing)
  outputs.write_text(os.path.join(workdir, "pool_report.md"), text)


def _cached(path: str, fingerprint: str, restore: bool = True):
  """Params (or True) when `path` holds a checkpoint with this fingerprint, else None."""
  if not os.path.isdir(path):
    return None
  try:
    meta = checkpoints.read_metadata(path)
  except Exception:
    return None
  if meta.custom.get(checkpoint_meta.META_KEY, {}).get("fingerprint") != fingerprint:
    return None
  return checkpoints.restore(path, meta.abstract) if restore else True


def scoring_key(eval_tasks: Sequence[str]) -> list[str]:
  """How each task is scored (its `scoring.Scoring`: kind, metric, delimiter...), so that
  cached scores computed under other semantics are not reused."""
  from recycle_jax.evaluation import scoring  # noqa: PLC0415
  builtin.register()
  return [repr(scoring._DECLARED.get(t)) for t in eval_tasks]


def _old_scores(manifest: str, eval_tasks, max_eval_examples) -> dict:
  meta_path = os.path.join(os.path.dirname(manifest), "pool_meta.json")
  if not (os.path.exists(manifest) and os.path.exists(meta_path)):
    return {}
  meta = json.load(open(meta_path))
  if meta.get("eval_tasks") != list(eval_tasks) or \
      meta.get("max_eval_examples") != max_eval_examples or \
      meta.get("scoring") != scoring_key(eval_tasks):
    return {}
  return {e.name: e.info["scores"] for e in pool_manifest.read_manifest(manifest).entries
          if "scores" in e.info}


def score_pool(pool: pool_manifest.Pool, eval_tasks: Sequence[str],
               max_examples: int | None = None) -> dict[str, dict]:
  """{name: {"dev": {task: s}, "test": {task: s}}} for every checkpoint."""
  builtin.register()
  meta = checkpoints.validate_pool(pool)
  cfg = transformer.ModelConfig(**meta.model_config)
  from recycle_jax import configurables  # noqa: PLC0415 (make_scorer.* bindings)
  score = jax.jit(configurables.make_scorer(transformer.Decoder(cfg)))
  vocab = vocabularies.for_evaluation(meta.tokenizer, cfg.vocab_size, pool.source)
  out = {}
  for e in tqdm(pool.entries, desc="score pool", leave=False):
    params = checkpoints.restore(e.path, meta.abstract, e.name)
    out[e.name] = {}
    for split in ("dev", "test"):
      datas = task_splits.load_split(eval_tasks, split, max_examples, vocab)
      task_data.check_context(datas, cfg.max_position_embeddings, "score_pool.eval_tasks")
      s = scorers.evaluate(score, params, datas)
      out[e.name][split] = {t: round(float(v), 4) for t, v in zip(eval_tasks, s)}
  return out
