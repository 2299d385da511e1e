"""The main job: pool -> validated metadata -> sharded params -> search -> merged + report.

Configuration arrives through gin (`Experiment`, `SearchConfig`, `make_mesh`, ...); the
stages below are the pure modules (checkpoints, merging, evaluation, population, search).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import gin
import jax
import numpy as np
from absl import logging

from recycle_jax import (baselines, checkpoints, evaluation, merging, models, partitioning,
                         population, reporting, search)
from recycle_jax.errors import UserError, check

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Experiment:
  pool: Any = gin.REQUIRED  # manifest path / directory, or [(name, path), ...]
  tasks: Sequence[str] = gin.REQUIRED  # held-in tasks: the fitness is their dev average
  report_tasks: Sequence[str] = ()  # held-out tasks: test scores reported, never searched
  max_examples: int | None = None  # per split, for quick runs
  top_n: int | None = None  # search only the N best checkpoints by dev fitness (ablation)
  save_merged: bool = True


@dataclasses.dataclass
class Loaded:
  """A validated pool restored onto the mesh, with the model that reads it."""
  pool: checkpoints.Pool
  params: tuple  # N parameter trees, sharded by the partitioning rules
  model_cfg: models.ModelConfig
  mesh: Any


def model_config_from(meta: checkpoints.CheckpointMeta, where: str) -> models.ModelConfig:
  cfg = meta.model_config
  check(cfg is not None, "checkpoint has no recycle_jax model config in its metadata", where,
        "write it with recycle_jax (or `recycle-jax convert` for Hugging Face models)")
  return models.ModelConfig(**cfg)


def load_pool(pool_spec) -> Loaded:
  pool = checkpoints.load_pool(pool_spec)
  meta = checkpoints.validate_pool(pool)  # metadata only: no array read yet
  cfg = model_config_from(meta, pool.entries[0].path)
  mesh = partitioning.make_mesh()
  shardings = partitioning.param_shardings(meta.abstract, mesh)
  abstract = partitioning.with_shardings(meta.abstract, shardings)
  return Loaded(pool, checkpoints.restore_pool(pool, abstract), cfg, mesh)


def nonfinite_members(loaded: Loaded) -> list[str]:
  """Names of pool members holding NaN/Inf (looked for once a merge came out non-finite)."""
  finite = jax.jit(merging.all_finite)
  return [n for n, p in zip(loaded.pool.names, loaded.params) if not bool(finite(p))]


def check_workdir(workdir: str, resume: bool, overwrite: bool, inputs: Sequence[str]) -> None:
  for src in inputs:
    check(not checkpoints._inside(workdir, src) and not checkpoints._inside(src, workdir),
          f"workdir {workdir} overlaps input checkpoint {src}", "--workdir",
          "choose a workdir outside the pool")
  if os.path.isdir(workdir) and os.listdir(workdir) and not (resume or overwrite):
    raise UserError(f"workdir {workdir} is not empty", "--workdir",
                    "pass --resume to continue it, --overwrite to replace it, or a new path")


def _write_config(workdir: str) -> None:
  if jax.process_index() == 0:
    checkpoints.atomic_write_text(os.path.join(workdir, "config.gin"),
                                  gin.operative_config_str())


def run_search(workdir: str, resume: bool = False, overwrite: bool = False,
               progress: bool = True) -> dict:
  exp = Experiment()
  scfg = search.SearchConfig()
  pool = checkpoints.load_pool(exp.pool)
  check(len(exp.tasks) > 0, "no tasks to search on", "Experiment.tasks",
        "bind Experiment.tasks to a list of seqio task names")
  check_workdir(workdir, resume, overwrite, pool.paths)
  # Cheap checks first: metadata of every checkpoint, every task and split.
  checkpoints.validate_pool(pool)
  dev = evaluation.load_split(exp.tasks, "dev", exp.max_examples)
  test_tasks = tuple(exp.tasks) + tuple(t for t in exp.report_tasks if t not in exp.tasks)
  test = evaluation.load_split(test_tasks, "test", exp.max_examples)
  check(scfg.strategy in search.STRATEGIES, f"unknown search strategy {scfg.strategy!r}",
        "SearchConfig.strategy", f"choose from {list(search.STRATEGIES)}")

  loaded = load_pool(exp.pool)
  score = evaluation.make_scorer(models.Decoder(loaded.model_cfg))
  if exp.top_n:
    loaded = top_n_subset(loaded, score, dev, exp.top_n)
  n = len(loaded.pool)
  pop = scfg.pop_size(n)
  mode = population.choose_mode(loaded.params, pop)
  logging.info("pool of %d, population %d, mode %s", n, pop, mode)
  pop_fn = jax.jit(population.make_population_fn(score, mode))
  scorer = population.CachedScorer(pop_fn, loaded.params, pop)

  # Single checkpoints (one-hot merges) and baselines, scored by the same program.
  eye = np.eye(n, dtype=np.float32)
  single_dev = scorer(eye, dev, "dev")
  bad = nonfinite_members(loaded) if np.isnan(single_dev).any() else []
  check(not bad, f"checkpoints {bad} hold NaN or Inf values, so every merge with them does "
        "(0 * NaN is NaN)", "Experiment.pool", "repair or drop them from the pool")
  # The workdir is only touched once every input has been read and checked.
  if overwrite and os.path.isdir(workdir) and not resume and jax.process_index() == 0:
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_config(workdir)

  base = baselines.baseline_weights(single_dev)
  seed_alphas = np.concatenate([eye, base["uniform"][None], base["merge_best"][None]])
  seed_scores = scorer(seed_alphas, dev, "dev")
  seeds = (seed_alphas, seed_scores, seed_scores.mean(-1))

  srch = search.Search(scfg, n, pop_fn)
  archive = search.run(srch, loaded.params, dev, workdir, resume=resume, seeds=seeds,
                       progress=progress)
  scorer.remember(np.asarray(archive.alphas), np.asarray(archive.scores),
                  [d.name for d in dev], "dev")
  best = archive.best()

  methods = {"search": np.asarray(archive.alphas[best]), **base}
  names = list(methods)
  w = np.stack([methods[m] for m in names])
  dev_scores = scorer(w, dev, "dev")
  test_scores = scorer(w, test, "test")
  single_test = scorer(eye, test, "test")

  results = reporting.build_results(
      tasks=list(exp.tasks), report_tasks=[d.name for d in test if d.name not in exp.tasks],
      pool_names=loaded.pool.names, single_dev=single_dev, single_test=single_test,
      methods={m: (w[i], dev_scores[i], test_scores[i]) for i, m in enumerate(names)},
      archive=archive, config={"search": dataclasses.asdict(scfg), "population_size": pop,
                               "population_mode": mode, "cache_hits": scorer.hits})

  if exp.save_merged:
    merged = jax.jit(merging.linear)(jax.numpy.asarray(methods["search"]), loaded.params)
    checkpoints.save(os.path.join(workdir, "merged"), merged,
                     merged_metadata(loaded, methods["search"], "search"), overwrite=True)
  if jax.process_index() == 0:
    reporting.write_run(workdir, results)
  _write_config(workdir)
  return results


def top_n_subset(loaded: Loaded, score, dev, top_n: int) -> Loaded:
  """The `top_n` checkpoints by dev fitness, in pool order (the paper's top-N ablation)."""
  check(1 <= top_n <= len(loaded.pool), f"top_n={top_n} but the pool has {len(loaded.pool)}",
        "Experiment.top_n", f"choose 1..{len(loaded.pool)}")
  fit = jax.jit(score)
  fitness = [float(np.mean(np.asarray(fit(p, dev)))) for p in loaded.params]
  keep = sorted(np.argsort(-np.asarray(fitness), kind="stable")[:top_n])
  pool = checkpoints.make_pool([loaded.pool.entries[i] for i in keep], loaded.pool.source)
  return dataclasses.replace(loaded, pool=pool, params=tuple(loaded.params[i] for i in keep))


def merged_metadata(loaded: Loaded, alphas: np.ndarray, method: str, **extra) -> dict:
  return {"model": loaded.model_cfg.to_dict(),
          "merge": {"method": method, "weights": [float(a) for a in alphas],
                    "pool": loaded.pool.names, **extra}}
