"""The main job: pool -> validated metadata -> sharded params -> search -> merged + report.

Configuration arrives through gin (`Experiment`, `SearchConfig`, `make_mesh`, ...); the
stages below are the pure modules (checkpoints, merging, evaluation, population, search).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np
from absl import logging

from recycle_jax import (baselines, checkpoints, configurables, evaluation, hf_io, merging,
                         mergekit_config, methods, models, outputs, pareto, partitioning,
                         population, reporting, search, spaces)
from recycle_jax import validation
from recycle_jax.errors import UserError, check

PyTree = Any
FORMATS = ("orbax", "hf")  # how a merge is written: Orbax checkpoint, Hugging Face folder


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Experiment:
  pool: Any = gin.REQUIRED  # manifest path / directory, a mergekit config (its models; its
  #                           base_model is the base unless `base` is bound), [(name, path)]
  tasks: Sequence[str] = gin.REQUIRED  # held-in tasks: the fitness is their dev average
  report_tasks: Sequence[str] = ()  # held-out tasks: test scores reported, never searched
  max_examples: int | None = None  # per split, for quick runs
  top_n: int | None = None  # search only the N best checkpoints by dev fitness (ablation)
  save_merged: bool = True
  merged_format: str = "orbax"  # or "hf": the merge as a Hugging Face folder (hf_io)
  base: str | None = None  # the checkpoint the pool was fine-tuned from: task-vector merges
  greedy_soup: bool = True  # the greedy-soup baseline (up to N - 1 more dev evaluations)


@dataclasses.dataclass
class Loaded:
  """A validated pool restored onto the mesh, with the model that reads it."""
  pool: checkpoints.Pool
  params: tuple  # N parameter trees, sharded by the partitioning rules
  model_cfg: models.ModelConfig
  mesh: Any
  tokenizer: Any = None  # the pool's tokenizer_files.Tokenizer; kept in merges
  source_config: dict | None = None  # the pool's Hugging Face config.json, if it has one

  @property
  def shardings(self) -> PyTree:
    """The parameters' placement: a merge lands sharded like the pool."""
    return partitioning.shardings_of(self.params[0])


def model_config_from(meta: checkpoints.CheckpointMeta, where: str) -> models.ModelConfig:
  cfg = meta.model_config
  check(cfg is not None, "checkpoint has no model family (no recycle_jax model config in "
        "its metadata): it can be merged, not evaluated", where,
        "evaluate checkpoints converted by `recycle-jax convert` or written by recycle_jax")
  return validation.build(models.ModelConfig, cfg, where, "re-write this checkpoint")


def load_pool(pool_spec, need_model: bool = True) -> Loaded:
  """The pool restored onto the mesh. Without `need_model`, any trees of arrays (MaxText,
  t5x, ...) load, with `model_cfg` None when they record no model: merging needs none."""
  pool = checkpoints.load_pool(pool_spec)
  meta = checkpoints.validate_pool(pool)  # metadata only: no array read yet
  cfg = (model_config_from(meta, pool.entries[0].path)
         if need_model or meta.model_config is not None else None)
  mesh = configurables.make_mesh()
  shardings = configurables.param_shardings(meta.abstract, mesh)
  abstract = partitioning.with_shardings(meta.abstract, shardings)
  return Loaded(pool, checkpoints.restore_pool(pool, abstract), cfg, mesh, meta.tokenizer,
                meta.custom.get(checkpoints.META_KEY, {}).get("hf_config"))


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
  if overwrite and not resume and os.path.isdir(workdir) and os.listdir(workdir):  # moved
    outputs.check_replaceable(workdir, "--workdir")


def _write_config(workdir: str) -> None:
  if jax.process_index() == 0:
    checkpoints.atomic_write_text(os.path.join(workdir, "config.gin"),
                                  gin.operative_config_str())


def load_base(path: str, loaded: Loaded) -> PyTree:
  """The base checkpoint, checked against the pool from metadata, placed like the pool."""
  entry = checkpoints.Entry("<base>", os.path.abspath(path))
  checkpoints.validate_pool(checkpoints.make_pool([entry, *loaded.pool.entries], path))
  abstract = partitioning.with_shardings(loaded.params[0], loaded.shardings)
  return checkpoints.restore(entry.path, abstract, "base")


def run_search(workdir: str, resume: bool = False, overwrite: bool = False,
               progress: bool = True, num_seeds: int = 1, merged_format: str | None = None
               ) -> dict:
  """The main job. num_seeds > 1 repeats the search with seeds seed..seed+K-1, each run in
  workdir/seed_k, sharing the loaded pool, the scorers' caches and the compiled programs;
  workdir then holds seed 0's results plus the mean and 95% CI over the seeds."""
  exp = Experiment()
  if merged_format is not None:
    exp = dataclasses.replace(exp, merged_format=merged_format)
  check(exp.merged_format in FORMATS, f"unknown format {exp.merged_format!r}",
        "--format / Experiment.merged_format", f"choose from {list(FORMATS)}")
  if exp.base is None and mergekit_config.is_config(exp.pool):  # the config's base_model
    exp = dataclasses.replace(exp, base=mergekit_config.pool_and_base(exp.pool)[1])
  scfg = configurables.SearchConfig()
  pool = checkpoints.load_pool(exp.pool)
  check(len(exp.tasks) > 0, "no tasks to search on", "Experiment.tasks",
        "bind Experiment.tasks to a list of seqio task names")
  check_workdir(workdir, resume, overwrite, pool.paths)
  # Cheap checks first: metadata of every checkpoint, every task and split.
  meta = checkpoints.validate_pool(pool)
  model_config_from(meta, pool.entries[0].path)  # evaluation needs a model family
  from recycle_jax import vocabularies  # seqio and TensorFlow: evaluation only
  vocab = vocabularies.for_evaluation(meta.tokenizer, (meta.model_config or {}).get(
      "vocab_size"), pool.source)  # every task is tokenized with the pool's tokenizer
  dev = evaluation.load_split(exp.tasks, "dev", exp.max_examples, vocab)
  test_tasks = tuple(exp.tasks) + tuple(t for t in exp.report_tasks if t not in exp.tasks)
  test = evaluation.load_split(test_tasks, "test", exp.max_examples, vocab)
  check(scfg.strategy in search.STRATEGIES, f"unknown search strategy {scfg.strategy!r}",
        "SearchConfig.strategy", f"choose from {list(search.STRATEGIES)}")
  check(num_seeds >= 1, f"num_seeds={num_seeds}", "--num_seeds", "pass 1 or more")
  method, _ = spaces.parse_space(scfg.merge_space)
  check(exp.base is not None or not methods.get(method).needs_base,
        f"merge space {scfg.merge_space!r} needs the base checkpoint", "Experiment.base",
        "bind Experiment.base to the checkpoint the pool was fine-tuned from")
  pareto.scalarization_args(scfg.scalarization, scfg.task_weights, len(exp.tasks))
  # One search per seed, each in its own workdir (the workdir itself for one seed).
  seeds = [(workdir if num_seeds == 1 else os.path.join(workdir, f"seed_{k}"),
            dataclasses.replace(scfg, seed=scfg.seed + k)) for k in range(num_seeds)]
  if resume and not exp.top_n:  # a damaged or foreign state: refused before any array read
    _check_saved(seeds, configurables.make_space(scfg.merge_space, meta.abstract, len(pool)),
                 dev)

  loaded = load_pool(exp.pool)
  dev, test = evaluation.place(dev, loaded.mesh), evaluation.place(test, loaded.mesh)
  base = load_base(exp.base, loaded) if exp.base else None
  score = configurables.make_scorer(models.Decoder(loaded.model_cfg))
  if exp.top_n:
    loaded = top_n_subset(loaded, score, dev, exp.top_n)
  n = len(loaded.pool)
  pop = scfg.pop_size(n)
  mode = configurables.choose_mode(loaded.params, pop)
  logging.info("pool of %d, population %d, mode %s", n, pop, mode)
  pop_fn = population.jit_population(population.make_population_fn(score, mode),
                                     loaded.params, loaded.mesh)
  scorer = population.CachedScorer(pop_fn, loaded.params, pop)

  # Single checkpoints (one-hot merges) and baselines, scored by the same program.
  eye = np.eye(n, dtype=np.float32)
  single_dev = scorer(eye, dev, "dev")
  bad = nonfinite_members(loaded) if np.isnan(single_dev).any() else []
  check(not bad, f"checkpoints {bad} hold NaN or Inf values, so every merge with them does "
        "(0 * NaN is NaN)", "Experiment.pool", "repair or drop them from the pool")
  space = configurables.make_space(scfg.merge_space, loaded.params[0], n)
  space_pop = scfg.pop_size(space.dim)
  space_mode = configurables.choose_mode(loaded.params, space_pop)
  sweep = configurables.SweepConfig()
  method_baselines = configurables.task_vector_baselines(n, base is not None)
  if resume and exp.top_n:  # the space is known once the top N are chosen
    _check_saved(seeds, space, dev)
  # The workdir is only touched once every input has been read and checked; one replaced
  # is set aside (WORKDIR.old-*) until the new run is complete, and put back if it fails.
  with outputs.set_aside(workdir, overwrite and not resume and jax.process_index() == 0):
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir)  # once: every configurable has been called, the config is complete

    shared = Shared(exp, loaded, dev, test, scorer, mode, single_dev, scorer(eye, test, "test"),
                    base, vocab=vocab)
    shared.baselines, shared.linear_baselines = evaluate_baselines(shared, method_baselines)
    space_scorer = scorer
    if not space.is_linear:  # its own program: merges of the space, P of them at a time
      operands = space.operands(loaded.params, base)
      fn = population.jit_population(population.make_population_fn(
          score, space_mode, space.merge), operands, loaded.mesh)
      space_scorer = population.CachedScorer(fn, operands, space_pop)
    runs = []
    for k, (wd, cfg) in enumerate(seeds):  # the Pareto sweep runs once, with the first seed
      runs.append(search_once(shared, cfg, space, space_scorer, wd, resume, progress,
                              sweep if k == 0 else dataclasses.replace(sweep, num_weights=0)))
    results = runs[0]
    if num_seeds > 1:
      results = reporting.with_seeds(runs[0], runs, [os.path.basename(wd) for wd, _ in seeds])
      write_results(workdir, results, runs)
  return results


def _check_saved(seeds, space: spaces.MergeSpace, dev) -> None:
  """Every seed's saved state, read whole, before the workdir changes."""
  for wd, cfg in seeds:
    search.check_saved_state(os.path.join(wd, search.STATE_DIR),
                             search.signature(cfg, space, dev))


@dataclasses.dataclass
class Shared:
  """What every search of one pool shares: data, scorers, the base, evaluated baselines."""
  exp: Experiment
  loaded: Loaded
  dev: tuple
  test: tuple
  scorer: population.CachedScorer  # linear merges
  mode: str
  single_dev: np.ndarray  # [N, T]
  single_test: np.ndarray  # [N, T + R]
  base: PyTree | None = None
  baselines: dict[str, reporting.MethodResult] = dataclasses.field(default_factory=dict)
  linear_baselines: Sequence[str] = ()  # those that are linear merges: the search's seeds
  vocab: Any = None  # the tasks' vocabulary (the pool's): adaptive fidelity's subsets
  programs: dict = dataclasses.field(default_factory=dict)  # the run's compiled generations

  @property
  def n(self) -> int:
    return len(self.loaded.pool)


def evaluate_baselines(sh: Shared, method_baselines: dict
                       ) -> tuple[dict[str, reporting.MethodResult], list[str]]:
  """Every baseline's result, and the names of the linear ones."""
  lin = baselines.baseline_weights(sh.single_dev)
  how = {}
  if sh.exp.greedy_soup:
    lin["greedy_soup"], soup = merging.greedy_soup(
        lambda a: np.mean(sh.scorer(a[None], sh.dev, "dev")[0]), sh.single_dev.mean(-1))
    how["greedy_soup"] = {"method": "greedy_soup",
                          "ingredients": [sh.loaded.pool.names[i] for i in soup]}
  names = list(lin)
  w = np.stack([lin[m] for m in names])
  dev, test = sh.scorer(w, sh.dev, "dev"), sh.scorer(w, sh.test, "test")
  out = {m: reporting.MethodResult(w[i], dev[i], test[i], how.get(m))
         for i, m in enumerate(names)}
  # Merged like the pool is placed, so the linear program scores them without recompiling.
  shardings = sh.loaded.shardings
  for m, (space, points) in method_baselines.items():  # task_vector_baselines' spaces
    merge = jax.jit(space.merge, out_shardings=shardings)
    trees = [merge(p, space.operands(sh.loaded.params, sh.base)) for p in points]
    devs = sh.scorer.score_trees(trees, sh.dev)
    i = int(np.argmax(np.nan_to_num(devs.mean(-1), nan=-np.inf)))  # lam chosen on dev
    out[m] = reporting.MethodResult(space.checkpoint_weights(points[i]), devs[i],
                                    sh.scorer.score_trees([trees[i]], sh.test)[0],
                                    space.describe(points[i]))
  return out, names


def search_once(sh: Shared, scfg: search.SearchConfig, space: spaces.MergeSpace,
                scorer: population.CachedScorer, workdir: str, resume: bool, progress: bool,
                sweep: pareto.SweepConfig) -> dict:
  """One search (and its Pareto sweep) from the shared baselines; writes workdir's run."""
  os.makedirs(workdir, exist_ok=True)
  # The linear baselines, as points of the space, seed the archive (and warm starts).
  seed_points = space.lift(np.concatenate(
      [np.eye(sh.n, dtype=np.float32)] +
      [sh.baselines[m].alphas[None] for m in sh.linear_baselines if m != "best_single"]))
  seed_scores = scorer(seed_points, sh.dev, "dev")
  names = [d.name for d in sh.dev]

  def run_one(cfg, wd):
    srch = search.Search(cfg, sh.n, scorer.population_fn, space, programs=sh.programs)
    subset = None
    # A fixed random subset of each dev split, the same for every search seed: its packed
    # shapes are then too, so seeds share one compiled program (a subset per seed cost a
    # 25 s compile each, 6x the search: 30 vs 5 s per search on code-instruct).
    if cfg.adaptive:
      subset = evaluation.place(tuple(
          evaluation.subset(d, cfg.fidelity_subset, 0)
          for d in evaluation.load_split(names, "dev", sh.exp.max_examples, sh.vocab)),
          sh.loaded.mesh)
    archive = search.run(srch, scorer.pool, sh.dev, wd, resume=resume, progress=progress,
                         seeds=(seed_points, seed_scores, srch.fitness(seed_scores)),
                         subset=subset)
    full = archive.full()  # subset estimates never enter the cache of dev scores
    scorer.remember(np.asarray(archive.alphas)[full], np.asarray(archive.scores)[full],
                    names, "dev")
    return srch, archive

  start = time.perf_counter()
  srch, archive = run_one(scfg, workdir)
  wall = time.perf_counter() - start  # the search alone (its first generation compiles)
  sweeps = [pareto.Sweep(c.scalarization, list(c.task_weights), run_one(
      c, os.path.join(workdir, "sweep", f"{c.scalarization}_{i}"))[1])
      for i, c in enumerate(pareto.sweep_configs(scfg, sweep, len(names)))]
  w = np.asarray(archive.alphas[archive.best()])
  found = reporting.MethodResult(space.checkpoint_weights(w), scorer(w[None], sh.dev, "dev")[0],
                                 scorer(w[None], sh.test, "test")[0], space.describe(w))
  hits = scorer.hits  # the run's record counts those before the front's test scores
  front_test = scorer(pareto.test_needed(archive, sweeps), sh.test, "test")
  record = reporting.RunResult(
      tasks=list(sh.exp.tasks),
      report_tasks=[d.name for d in sh.test if d.name not in sh.exp.tasks],
      pool_names=sh.loaded.pool.names, single_dev=sh.single_dev, single_test=sh.single_test,
      methods={"search": found, **sh.baselines}, archive=archive,
      config={"search": dataclasses.asdict(scfg), "population_size": srch.pop,
              "sigma_init": srch.sigma, "dev_examples_evaluated": archive.dev_examples(),
              "search_wall_s": round(wall, 2),
              "dev_examples": {d.name: int(d.num_examples) for d in sh.dev},
              "population_mode": sh.mode, "cache_hits": hits,
              "merge_space": {"name": space.name, "groups": list(space.groups),
                              "tuned": list(space.tuned)}},
      space=space, sweeps=sweeps, front_test=front_test, reference=sweep.reference)
  if sh.exp.save_merged:
    merged = jax.jit(space.merge, out_shardings=sh.loaded.shardings)(
        jax.numpy.asarray(w), scorer.pool)
    save_merged(os.path.join(workdir, "merged"), sh.loaded, merged,
                merged_metadata(sh.loaded, space.checkpoint_weights(w), "search",
                                space=space.describe(w)), sh.exp.merged_format, overwrite=True)
  results = reporting.build_results(record)
  write_results(workdir, results)
  return results


def write_results(workdir: str, results: dict, runs: Sequence[dict] = ()) -> None:
  if jax.process_index() == 0:  # one writer
    reporting.write_run(workdir, results, runs)


def top_n_subset(loaded: Loaded, score, dev, top_n: int) -> Loaded:
  """The `top_n` checkpoints by dev fitness, in pool order (the paper's top-N ablation)."""
  check(1 <= top_n <= len(loaded.pool), f"top_n={top_n} but the pool has {len(loaded.pool)}",
        "Experiment.top_n", f"choose 1..{len(loaded.pool)}")
  fit = jax.jit(score)
  fitness = [float(np.mean(evaluation.evaluate(fit, p, dev))) for p in loaded.params]
  keep = sorted(np.argsort(-np.asarray(fitness), kind="stable")[:top_n])
  pool = checkpoints.make_pool([loaded.pool.entries[i] for i in keep], loaded.pool.source)
  return dataclasses.replace(loaded, pool=pool, params=tuple(loaded.params[i] for i in keep))


def merged_metadata(loaded: Loaded, alphas: np.ndarray, method: str, **extra) -> dict:
  out = {"model": loaded.model_cfg.to_dict() if loaded.model_cfg else None,
         "merge": {"method": method, "weights": [float(a) for a in alphas],
                   "pool": loaded.pool.names, **extra}}
  if loaded.source_config:  # so an export to Hugging Face keeps the pool's values
    out["hf_config"] = loaded.source_config
  return out


def save_merged(path: str, loaded: Loaded, params: PyTree, custom: dict, fmt: str,
                overwrite: bool = False) -> None:
  """The merge as an Orbax checkpoint or (fmt 'hf') a Hugging Face folder, the pool's
  tokenizer kept with it either way."""
  if fmt == "hf":
    hf_io.save_folder(path, loaded.model_cfg, params, loaded.source_config,
                      loaded.tokenizer, overwrite)
  else:
    checkpoints.save(path, params, custom, overwrite=overwrite, tokenizer=loaded.tokenizer)
