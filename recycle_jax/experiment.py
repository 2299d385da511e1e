"""The main job, `run_search`: one linear driver over named stages (check_inputs, place,
score_singles, score_baselines, search_once: search, sweep, write), as flax's lm1b
`train_and_evaluate`.

Configuration arrives through gin (`Experiment`, and through `configurables` the search
and sweep configs, mesh, scorer, merge space and baselines), built once per run; the
stages call the pure modules (checkpoints, merging, evaluation, population, search). The
run owns its compiled programs (`population.Programs`); its result is a
`records.RunResult` of `records.MethodResult`s, which `reporting` turns into
results.json.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np
from absl import logging

from recycle_jax.runtime import outputs
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import irt, task_data
from recycle_jax.evaluation import scorers
from recycle_jax.reporting import records
from recycle_jax.tasks import builtin
from recycle_jax.search import baselines, irt_fitness, loop, pareto, population, strategies
from recycle_jax import configurables
from recycle_jax.merging import kernels, methods, spaces
from recycle_jax.checkpoint_io import mergekit_config
from recycle_jax.models import transformer
from recycle_jax.runtime.errors import UserError, check
from recycle_jax import placed_pool
from recycle_jax.placed_pool import FORMATS, PlacedPool, load_base, model_config_from, nonfinite_members, save_merge

PyTree = Any


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
  log_samples: bool = False  # test tasks' per-document records (workdir/samples/METHOD)
  steps: str | None = None  # pool = a training run's directory: its steps (training_run)


def check_workdir(workdir: str, resume: bool, overwrite: bool, inputs: Sequence[str]) -> None:
  for src in inputs:
    check(not outputs.inside(workdir, src) and not outputs.inside(src, workdir),
          f"workdir {workdir} overlaps input checkpoint {src}", "--workdir",
          "choose a workdir outside the pool")
  if os.path.isdir(workdir) and os.listdir(workdir) and not (resume or overwrite):
    raise UserError(f"workdir {workdir} is not empty", "--workdir",
                    "pass --resume to continue it, --overwrite to replace it, or a new path")
  if overwrite and not resume and os.path.isdir(workdir) and os.listdir(workdir):  # moved
    outputs.check_replaceable(workdir, "--workdir")


def _write_config(workdir: str) -> None:
  if jax.process_index() == 0:
    outputs.write_text(os.path.join(workdir, "config.gin"),
                                  gin.operative_config_str())


def run_search(workdir: str, resume: bool = False, overwrite: bool = False,
               progress: bool = True, num_seeds: int = 1, merged_format: str | None = None,
               exp: Experiment | None = None, pool: pool_manifest.Pool | None = None) -> dict:
  """The main job, in stages: load and validate the pool, place the data, score the single
  checkpoints and the baselines, search, sweep, write. num_seeds > 1 repeats the search
  with seeds seed..seed+K-1, each run in workdir/seed_k, sharing the loaded pool, the
  scorers' caches and the run's compiled programs; workdir then holds seed 0's results
  plus the mean and 95% CI over the seeds."""
  builtin.register()
  # Configuration: gin builds the run's objects, once.
  exp = exp if exp is not None else configured_experiment(merged_format)
  scfg, sweep = configurables.SearchConfig(), configurables.SweepConfig()
  # 1. Load and validate: every input checked from metadata before any array is read.
  inputs = check_inputs(exp, scfg, workdir, resume, overwrite, num_seeds, pool)
  seeds = [(workdir if num_seeds == 1 else os.path.join(workdir, f"seed_{k}"),
            dataclasses.replace(scfg, seed=scfg.seed + k)) for k in range(num_seeds)]
  if resume and not exp.top_n:  # a damaged or foreign state: refused before any array read
    _check_saved(seeds, configurables.make_space(scfg.merge_space, inputs.meta.abstract,
                                                 len(inputs.pool)), inputs.dev,
                 fingerprints(inputs.pool, exp.base, inputs.dev))
  # 2. Place the pool and the data on the mesh.
  run = place(exp, inputs)
  # 3. Score the single checkpoints, then (once the workdir is prepared) the baselines.
  score_singles(run, scfg.pop_size(run.n))
  space = configurables.make_space(scfg.merge_space, run.loaded.params[0], run.n)
  space_scorer = run.programs.scorer(space, scfg.pop_size(space.dim))
  method_baselines = configurables.task_vector_baselines(run.n, run.base is not None)
  if resume and exp.top_n:  # the space is known once the top N are chosen
    _check_saved(seeds, space, run.dev, run.content)
  # The workdir is only touched once every input has been read and checked; one replaced
  # is set aside (WORKDIR.old-*) until the new run is complete, and put back if it fails.
  with outputs.set_aside(workdir, overwrite and not resume and jax.process_index() == 0), \
      outputs.removed_if_empty(workdir):
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir)  # once: every configurable has been called, the config is complete
    run.single_test = run.scorer(np.eye(run.n, dtype=np.float32), run.test, "test")
    score_baselines(run, method_baselines)
    # 4-6. Per seed: search, sweep (the first seed only), write.
    runs = [search_once(run, cfg, space, space_scorer, wd, resume, progress,
                        sweep if k == 0 else dataclasses.replace(sweep, num_weights=0))
            for k, (wd, cfg) in enumerate(seeds)]
    results = runs[0]
    if num_seeds > 1:
      results = records.with_seeds(runs[0], runs, [os.path.basename(wd) for wd, _ in seeds])
      write_results(workdir, results, runs)
  return results


def configured_experiment(merged_format: str | None = None) -> Experiment:
  """The gin-bound `Experiment`, --format applied, a mergekit config's base_model as the
  base unless one is bound."""
  exp = Experiment()
  if merged_format is not None:
    exp = dataclasses.replace(exp, merged_format=merged_format)
  check(exp.merged_format in FORMATS, f"unknown format {exp.merged_format!r}",
        "--format / Experiment.merged_format", f"choose from {list(FORMATS)}")
  if exp.base is None and mergekit_config.is_config(exp.pool):
    exp = dataclasses.replace(exp, base=mergekit_config.pool_and_base(exp.pool)[1])
  return exp


@dataclasses.dataclass(frozen=True)
class Inputs:
  """A run's inputs, checked from metadata: the pool, its metadata, the tasks' splits
  (on the host) and their vocabulary (the pool's)."""
  pool: pool_manifest.Pool
  meta: checkpoint_meta.CheckpointMeta
  dev: tuple
  test: tuple
  vocab: Any


def check_inputs(exp: Experiment, scfg: loop.SearchConfig, workdir: str, resume: bool,
                 overwrite: bool, num_seeds: int, pool: pool_manifest.Pool | None = None
                 ) -> Inputs:
  """Cheap checks first: metadata of every checkpoint, every task and split, the config.
  `pool`: the manifest as the entry point read it (read here when not given); the run
  reads and validates it only here, once."""
  pool = pool if pool is not None else pool_manifest.load_pool(exp.pool, exp.steps)
  check(len(exp.tasks) > 0, "no tasks to search on", "Experiment.tasks",
        "bind Experiment.tasks to a list of seqio task names")
  check_workdir(workdir, resume, overwrite, pool.paths)
  meta = checkpoints.validate_pool(pool)
  model_cfg = model_config_from(meta, pool.entries[0].path)  # evaluation needs a family
  from recycle_jax.evaluation import vocabularies  # seqio and TensorFlow: evaluation only
  vocab = vocabularies.for_evaluation(meta.tokenizer, (meta.model_config or {}).get(
      "vocab_size"), pool.source)  # every task is tokenized with the pool's tokenizer
  dev = task_splits.load_split(exp.tasks, "dev", exp.max_examples, vocab)
  test_tasks = tuple(exp.tasks) + tuple(t for t in exp.report_tasks if t not in exp.tasks)
  test = task_splits.load_split(test_tasks, "test", exp.max_examples, vocab)
  task_data.check_context(dev + test, model_cfg.max_position_embeddings, "Experiment.tasks")
  strategies.get(scfg.strategy)  # an unknown name is refused before anything runs
  if scfg.irt:  # per-item device scores, and no more items than a dev split has
    irt.check_items(dev, scfg.irt_items)
  check(num_seeds >= 1, f"num_seeds={num_seeds}", "--num_seeds", "pass 1 or more")
  method, _ = spaces.parse_space(scfg.merge_space)
  check(exp.base is not None or not methods.get(method).needs_base,
        f"merge space {scfg.merge_space!r} needs the base checkpoint", "Experiment.base",
        "bind Experiment.base to the checkpoint the pool was fine-tuned from")
  pareto.scalarization_args(scfg.scalarization, scfg.task_weights, len(exp.tasks))
  if pool.steps is not None:  # a training run's LAWA and EMA: their bindings, checked now
    configurables.training_run_weights(min(exp.top_n or len(pool), len(pool)))
  return Inputs(pool, meta, dev, test, vocab)


def _check_saved(seeds, space: spaces.MergeSpace, dev, inputs: dict) -> None:
  """Every seed's saved state, read whole, before the workdir changes."""
  for wd, cfg in seeds:
    loop.check_saved_state(os.path.join(wd, loop.STATE_DIR),
                           loop.signature(cfg, space, dev, inputs))


def fingerprints(pool, base: str | None, dev) -> dict[str, str]:
  """What a search computes on, by content: the pool's members, the base and the dev
  splits as read on the host (a resume refuses any of them changed, naming it)."""
  out = pool.fingerprints()
  if base is not None:
    out["base"] = pool_manifest.fingerprint(base)
  out.update({f"dev[{d.name}]": loop.data_fingerprint(d) for d in dev})
  return out


@dataclasses.dataclass
class Run:
  """What every search of one run shares: the pool and the data placed, the base, the
  run's compiled programs (with their caches of scores), the single checkpoints' scores
  and the baselines' results."""
  exp: Experiment
  loaded: PlacedPool
  dev: tuple
  test: tuple
  programs: population.Programs
  base: PyTree | None = None
  vocab: Any = None  # the tasks' vocabulary (the pool's)
  host_dev: tuple = ()  # the dev splits on the host, as read once: fidelity's subsets
  content: dict = dataclasses.field(default_factory=dict)  # `fingerprints`: for --resume
  mode: str = ""  # the linear program's population mode
  scorer: population.CachedScorer | None = None  # linear merges of the pool, P at a time
  single_dev: np.ndarray | None = None  # [N, T]
  single_test: np.ndarray | None = None  # [N, T + R]
  baselines: dict[str, records.MethodResult] = dataclasses.field(default_factory=dict)
  seed_weights: np.ndarray | None = None  # [S, N]: the linear merges seeding every search

  @property
  def n(self) -> int:
    return len(self.loaded.pool)


def place(exp: Experiment, inputs: Inputs) -> Run:
  """The pool restored onto the mesh (its top N when asked), the splits placed, the base."""
  loaded = placed_pool.place(inputs.pool, meta=inputs.meta)  # the checked inputs, not the manifest again
  dev, test = task_data.place(inputs.dev, loaded.mesh), task_data.place(inputs.test,
                                                                         loaded.mesh)
  base = load_base(exp.base, loaded) if exp.base else None
  score = configurables.make_scorer(transformer.Decoder(loaded.model_cfg))
  if exp.top_n:
    loaded = top_n_subset(loaded, score, dev, exp.top_n)
  programs = population.Programs(score, loaded.params, base, loaded.mesh,
                                 configurables.choose_mode,
                                 irt.item_scorer(transformer.Decoder(loaded.model_cfg)))
  return Run(exp, loaded, dev, test, programs, base, inputs.vocab, host_dev=inputs.dev,
             content=fingerprints(loaded.pool, exp.base, inputs.dev))


def score_singles(run: Run, size: int) -> None:
  """Every checkpoint alone (one-hot merges) on dev, by the linear program of population
  `size`; a pool member holding NaN or Inf is refused."""
  run.mode = run.programs.choose_mode(run.loaded.params, size)
  logging.info("pool of %d, population %d, mode %s", run.n, size, run.mode)
  run.scorer = run.programs.scorer(spaces.MergeSpace(n=run.n), size)
  run.single_dev = run.scorer(np.eye(run.n, dtype=np.float32), run.dev, "dev")
  bad = nonfinite_members(run.loaded) if np.isnan(run.single_dev).any() else []
  check(not bad, f"checkpoints {bad} hold NaN or Inf values, so every merge with them does "
        "(0 * NaN is NaN)", "Experiment.pool", "repair or drop them from the pool")


def score_baselines(run: Run, method_baselines: dict) -> None:
  """The linear baselines (their weights also seed every search) and the merge methods'
  (`baselines.task_vector_baselines`: a space and candidate points each): each candidate
  merged by its space, scored by the run's program for one tree, its hyperparameters
  chosen on dev."""
  lin = baselines.baseline_weights(run.single_dev)
  how = {}
  steps = run.loaded.pool.steps
  if steps is not None:  # one training run's checkpoints, in step order: LAWA and EMA
    lin.update(configurables.training_run_weights(run.n))
    how.update({m: {"method": m, "steps": steps} for m in ("lawa", "ema")})
  if run.exp.greedy_soup:
    lin["greedy_soup"], soup = kernels.greedy_soup(
        lambda a: np.mean(run.scorer(a[None], run.dev, "dev")[0]), run.single_dev.mean(-1))
    how["greedy_soup"] = {"method": "greedy_soup",
                          "ingredients": [run.loaded.pool.names[i] for i in soup]}
  names = list(lin)
  w = np.stack([lin[m] for m in names])
  dev, test = run.scorer(w, run.dev, "dev"), run.scorer(w, run.test, "test")
  run.baselines = {m: records.MethodResult(w[i], dev[i], test[i], how.get(m))
                   for i, m in enumerate(names)}
  run.seed_weights = np.concatenate([np.eye(run.n, dtype=np.float32)] +
                                    [lin[m][None] for m in names if m != "best_single"])
  for m, (space, points) in method_baselines.items():  # merged where the pool lies
    merge = jax.jit(space.merge, out_shardings=run.loaded.shardings)
    trees = [merge(p, space.operands(run.loaded.params, run.base)) for p in points]
    devs = run.programs.score_trees(trees, run.dev)
    i = int(np.argmax(np.nan_to_num(devs.mean(-1), nan=-np.inf)))  # lam chosen on dev
    run.baselines[m] = records.MethodResult(
        space.checkpoint_weights(points[i]), devs[i],
        run.programs.score_trees([trees[i]], run.test)[0], space.describe(points[i]))


def search_once(run: Run, scfg: loop.SearchConfig, space: spaces.MergeSpace,
                scorer: population.CachedScorer, workdir: str, resume: bool, progress: bool,
                sweep: pareto.SweepConfig) -> dict:
  """One search and its Pareto sweep, from seeds that enter each archive once (the linear
  baselines as points of the space, scored once); their record written to workdir."""
  os.makedirs(workdir, exist_ok=True)
  points = space.lift(run.seed_weights)
  seeds = loop.Seeds.of(space, points, scorer(points, run.dev, "dev"),
                          spaces.get(scfg.parametrization))
  start = time.perf_counter()
  archive = run_one(run, scfg, space, scorer, seeds, workdir, resume, progress)
  wall = time.perf_counter() - start  # the search alone (its first generation compiles)
  sweeps = [pareto.Sweep(c.scalarization, list(c.task_weights), run_one(
      run, c, space, scorer, seeds, os.path.join(workdir, "sweep", f"{c.scalarization}_{i}"),
      resume, progress)) for i, c in enumerate(pareto.sweep_configs(scfg, sweep, len(run.dev)))]
  best = archive.best()
  w = np.asarray(archive.points[best])
  found = records.MethodResult(space.checkpoint_weights(w), archive.scores[best],
                                 scorer(w[None], run.test, "test")[0], space.describe(w))
  config = run_config(run, scfg, space, archive, wall, scorer.hits)
  record = records.RunResult(
      list(run.exp.tasks), [d.name for d in run.test if d.name not in run.exp.tasks],
      run.loaded.pool.names, run.single_dev, run.single_test,
      {"search": found, **run.baselines}, archive, config, space, sweeps,
      scorer(pareto.test_needed(archive, sweeps), run.test, "test"), sweep.reference)
  if run.exp.save_merged:  # the merge job's path
    save_merge(run.loaded, space, w, run.base, os.path.join(workdir, "merged"), "search",
               {"space": found.merge}, run.exp.merged_format, overwrite=True)
  results = records.build_results(record)
  write_results(workdir, results)
  if run.exp.log_samples:
    log_samples(run, space, w, workdir)
  return results


def log_samples(run: Run, space: spaces.MergeSpace, w: np.ndarray, workdir: str) -> None:
  """Every test task's per-document records (lm-eval's samples format) of the search's
  merge and of every baseline merged by its weights (`uniform`, `best_single`,
  `greedy_soup`, ...), in workdir/samples/METHOD/samples_TASK.jsonl."""
  from recycle_jax.tasks import harness
  decoder = transformer.Decoder(run.loaded.model_cfg)
  merge = jax.jit(space.merge, out_shardings=run.loaded.shardings)
  linear = jax.jit(kernels.linear, out_shardings=run.loaded.shardings)
  trees = {"search": lambda: merge(w, space.operands(run.loaded.params, run.base))}
  for m, r in run.baselines.items():
    if r.merge is None or r.merge.get("method") == "greedy_soup":  # merged by its weights
      trees[m] = lambda a=r.alphas: linear(np.asarray(a, np.float32), run.loaded.params)
  for m, tree in trees.items():
    _, details = harness.evaluate(run.programs.score_tree, tree(), run.test, samples=True,
                                  decoder=decoder)
    if jax.process_index() == 0:  # every process runs the program, one writes
      harness.write_samples(os.path.join(workdir, "samples", m),
                            {t: s for t, (_, s) in details.items()}, overwrite=True)


def run_one(run: Run, cfg: loop.SearchConfig, space: spaces.MergeSpace,
            scorer: population.CachedScorer, seeds: loop.Seeds, workdir: str, resume: bool,
            progress: bool) -> loop.Archive:
  """One search of `space` from `seeds`, on the full dev splits or (adaptive fidelity) on
  a fixed random subset of each first."""
  srch = loop.Search(cfg, run.n, scorer.population_fn, space,
                     programs=run.programs.generations,
                     inputs=run.content)
  subset = None
  # A fixed random subset of each dev split, the same for every search seed: its packed
  # shapes are then too, so seeds share one compiled program (a subset per seed cost a
  # 25 s compile each, 6x the search: 30 vs 5 s per search on code-instruct).
  if cfg.adaptive:
    subset = task_data.place(tuple(
        task_splits.subset(d, cfg.fidelity_subset, 0) for d in run.host_dev), run.loaded.mesh)
  calibration = None
  if cfg.irt:  # the seeds' per-item correctness, the 2PL fit, the chosen items
    calibration = irt_calibration(run, cfg, space, scorer, seeds)
    srch.item_fn = calibration.item_fn
    subset = calibration.subset()
  return loop.run(srch, scorer.pool, run.dev, workdir, resume=resume, progress=progress,
                    seeds=seeds, subset=subset, calibration=calibration)


def irt_calibration(run: Run, cfg: loop.SearchConfig, space: spaces.MergeSpace,
                    scorer: population.CachedScorer, seeds: loop.Seeds
                    ) -> irt_fitness.Calibration:
  """IRT fitness's calibration: the seeds scored item by item on the full dev splits by
  the run's cached per-item program of the space (the population's width): every search
  of the run after the first finds the seeds' hits in its cache."""
  host_dev = run.host_dev
  irt.check_items(host_dev, cfg.irt_items)
  calibration = irt_fitness.Calibration(
      run.programs.item_scorer(space, scorer.population_size), run.dev, host_dev,
      run.loaded.mesh, cfg.irt_items, cfg.irt_select)
  calibration.score(np.asarray(seeds.points))
  return calibration


def run_config(run: Run, scfg: loop.SearchConfig, space: spaces.MergeSpace,
               archive: loop.Archive, wall: float, hits: int) -> dict:
  """results.json's `config`: the search's, and how it ran."""
  return {"search": dataclasses.asdict(scfg), "population_size": scfg.pop_size(space.dim),
          "sigma_init": scfg.sigma(), "dev_examples_evaluated": archive.dev_examples(),
          "search_wall_s": round(wall, 2),
          "dev_examples": {d.name: int(d.num_examples) for d in run.dev},
          "population_mode": run.mode, "cache_hits": hits,
          "merge_space": {"name": space.name, "groups": list(space.groups),
                          "tuned": list(space.tuned)}}


def write_results(workdir: str, results: dict, runs: Sequence[dict] = ()) -> None:
  if jax.process_index() == 0:  # one writer
    records.write_run(workdir, results, runs)


def top_n_subset(loaded: PlacedPool, score, dev, top_n: int) -> PlacedPool:
  """The `top_n` checkpoints by dev fitness, in pool order (the paper's top-N ablation)."""
  check(1 <= top_n <= len(loaded.pool), f"top_n={top_n} but the pool has {len(loaded.pool)}",
        "Experiment.top_n", f"choose 1..{len(loaded.pool)}")
  fit = jax.jit(score)
  fitness = [float(np.mean(scorers.evaluate(fit, p, dev))) for p in loaded.params]
  keep = sorted(np.argsort(-np.asarray(fitness), kind="stable")[:top_n])
  pool = pool_manifest.make_pool([loaded.pool.entries[i] for i in keep], loaded.pool.source)
  return dataclasses.replace(loaded, pool=pool, params=tuple(loaded.params[i] for i in keep))
