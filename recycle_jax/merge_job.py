"""`recycle-jax merge`: explicit weights, a merge method, a greedy soup or a streamed merge
of a pool, saved by `placed_pool.save_merge` (the path the search job's merge takes too).

Light to import: a streamed merge never loads Orbax or the search's stages, and nothing
here imports TensorFlow or seqio until a greedy soup scores its tasks.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np

from recycle_jax import placed_pool
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.placed_pool import PlacedPool
from recycle_jax.checkpoint_io import checkpoint_meta
from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.runtime import outputs
from recycle_jax.evaluation import task_data
from recycle_jax.evaluation import task_splits
from recycle_jax.merging import kernels, methods, spaces
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError, check

PyTree = Any


def merge_choices() -> tuple[str, ...]:
  """--method's choices, from the registry: 'layerwise' and the soup beside the methods."""
  return (("linear", "layerwise") + tuple(m for m in methods.REGISTRY if m != "linear") +
          ("greedy_soup",))


@dataclasses.dataclass(frozen=True)
class MergeRequest:
  """`recycle-jax merge`'s arguments, as given (its errors name the flags)."""
  pool: str
  output: str
  method: str = "linear"  # a merge space name, or 'greedy_soup'
  weights: str | None = None  # --weights: N (G * N layer-wise) numbers; None: uniform
  base: str | None = None
  hparams: dict = dataclasses.field(default_factory=dict)  # the hyperparameter flags given
  seed: int = 0  # the random methods' key
  tasks: str | None = None  # greedy soup: the tasks whose dev splits score soups
  max_examples: int | None = None
  fmt: str = "orbax"
  overwrite: bool = False
  streaming: bool = False
  memory_budget_mb: float = 256.0
  fsync: bool = True
  progress: bool = True
  inputs: Sequence[str] = ()  # other inputs (gin files) the output must not touch
  steps: str | None = None  # --steps: pool is a training run's directory (training_run)


@dataclasses.dataclass(frozen=True)
class _Checked:
  pool: pool_manifest.Pool
  meta: checkpoint_meta.CheckpointMeta
  spec: methods.MergeMethod
  hparams: dict  # every method's hyperparameter: given or its default
  alphas: np.ndarray  # [N] or [G * N], each row checked and normalized


def run_merge(req: MergeRequest) -> None:
  """The merge job: every flag checked against the pool's metadata before any array is
  read, then streamed (linear, out of core) or merged in memory by `placed_pool.save_merge`."""
  c = check_request(req)
  if req.streaming:
    return _stream(req, c)
  soup = req.method == "greedy_soup"
  if soup or req.fmt == "hf":  # scoring and Hugging Face layouts need a model family
    placed_pool.model_config_from(c.meta, c.pool.entries[0].path)
  loaded = placed_pool.place(c.pool, need_model=soup, meta=c.meta)  # as checked
  alphas, how = c.alphas, None
  if soup:
    alphas, how = greedy_soup(loaded, req)
  space = spaces.make_space("linear" if soup else req.method, loaded.params[0], len(c.pool),
                            tune=False, seed=req.seed, **c.hparams)
  base = placed_pool.load_base(req.base, loaded) if c.spec.needs_base else None
  w = np.asarray(alphas, np.float32)
  placed_pool.save_merge(loaded, space, w, base, req.output, req.method,
             {"space": space.describe(w)} if how is None else how, req.fmt, req.overwrite)


def check_request(req: MergeRequest) -> _Checked:
  """Every flag, in order, against the pool's and the base's metadata; the output's room."""
  pool = pool_manifest.load_pool(req.pool, req.steps)
  meta = checkpoints.validate_pool(pool)
  if req.base is not None:  # a base is checked whether the method uses it or not
    checkpoints.validate_pool(pool_manifest.make_pool(
        [pool_manifest.Entry("base", os.path.abspath(req.base)), *pool.entries], "--base"))
  choices = merge_choices()
  check(req.method in choices + spaces.space_names(), f"unknown merge method "
        f"{req.method!r}", "--method", f"choose from {list(choices)}")
  soup = req.method == "greedy_soup"
  method, layerwise = ("linear", False) if soup else spaces.parse_space(req.method)
  spec = methods.get(method)
  check(req.base is not None or not spec.needs_base,
        f"--method={req.method} needs the base checkpoint", "--base",
        "pass --base=CKPT, the checkpoint the pool was fine-tuned from")
  spec.check_pool(len(pool), True, "--base")
  hparams = _hparams(req, spec)
  check(not req.streaming or req.method == "linear", "--streaming merges linearly only",
        "--streaming", "drop --streaming for other methods")
  check(not req.streaming or pool.steps is None, "--streaming reads whole checkpoints, not "
        "the parameters inside a training run's train states", "--streaming",
        "drop --streaming (the in-memory merge reads only the parameters)")
  check(not soup or req.tasks, "greedy_soup scores soups on tasks' dev splits", "--tasks",
        "pass --tasks=rj_code,rj_math")
  check(not soup or req.weights is None, "greedy_soup chooses its own weights", "--weights",
        "drop --weights")
  groups = kernels.layer_groups(meta.abstract)[0] if layerwise else ()
  alphas = explicit_weights(req.weights, len(pool), groups, spec.negative_weights)
  nbytes = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(meta.abstract))
  inputs = [p for p in (*pool.paths, pool.source if os.path.isfile(pool.source) else None,
                        req.base, *req.inputs) if p]
  outputs.check_output(req.output, inputs, req.overwrite, nbytes=nbytes)
  return _Checked(pool, meta, spec, hparams, alphas)


def _hparams(req: MergeRequest, spec: methods.MergeMethod) -> dict:
  """Every method's hyperparameter, given or its default; a flag the method would ignore
  is refused, a given value checked against its bounds."""
  given = {h: v for h, v in req.hparams.items() if v is not None}
  for h in sorted(set(given) - {h.name for h in spec.hparams}):
    takes = [m for m, s in methods.REGISTRY.items() if h in {x.name for x in s.hparams}]
    raise UserError(f"--method={req.method} takes no --{h}", f"--{h}",
                    f"drop it, or choose a method that takes it ({', '.join(takes)})")
  values = {h.name: given.get(h.name, h.default) for h in methods.hparams_by_name().values()}
  for h in spec.hparams:
    lo, hi = h.valid
    check(lo < values[h.name] <= hi, f"{h.name} {values[h.name]} is not in ({lo:g}, {hi:g}]",
          f"--{h.name}")
  return values


def explicit_weights(weights: str | None, n: int, groups: Sequence[str],
                     allow_negative: bool) -> np.ndarray:
  """`--weights`: N numbers (uniform when None), or one row of N per layer group; each row
  checked and normalized -> [G * N] (or [N])."""
  rows = max(1, len(groups))
  values = ([1.0] * (rows * n) if weights is None else
            validation.parse_numbers(weights, "--weights"))
  validation.check_weights(values, rows * n, "--weights", signed=allow_negative,
                           what=(f"{rows} layer groups of {n} checkpoints "
                                 f"({', '.join(groups)})" if groups else ""))
  return np.concatenate([kernels.check_explicit_weights(
      values[r * n:(r + 1) * n], n, allow_negative=allow_negative) for r in range(rows)])


def _stream(req: MergeRequest, c: _Checked) -> None:
  """The linear merge out of core: Hugging Face folders into a Hugging Face folder, or
  Orbax checkpoints into an Orbax checkpoint."""
  from recycle_jax.checkpoint_io import hf_reader
  folders = [hf_reader.is_hf_folder(p) for p in c.pool.paths]
  if any(folders):
    check(all(folders) and req.fmt == "hf", "--streaming merges Hugging Face folders "
          "into a Hugging Face folder only", "--format",
          "pass --format=hf, or drop --streaming (the in-memory merge writes either)")
    from recycle_jax.merging import hf_merge  # noqa: PLC0415
    hf_merge.merge_pool(c.pool, c.alphas, req.output, req.overwrite, c.meta.tokenizer,
                        fsync=req.fsync)  # (units of fixed size: no budget to keep)
    return
  check(req.fmt == "orbax", "--streaming writes Orbax checkpoints from Orbax pools",
        "--format", "drop --streaming to write a Hugging Face folder")
  from recycle_jax.merging import streaming  # noqa: PLC0415
  streaming.merge_to_disk(c.pool, c.meta, c.alphas, req.output,
                          memory_budget_mb=req.memory_budget_mb, overwrite=req.overwrite,
                          fsync=req.fsync, progress=req.progress)


def greedy_soup(loaded: PlacedPool, req: MergeRequest) -> tuple[np.ndarray, dict]:
  """Greedy soup on the dev split of the request's tasks: (alphas [N], its ingredients)."""
  from recycle_jax import configurables
  from recycle_jax.models import transformer
  from recycle_jax.search import population
  from recycle_jax.evaluation import vocabularies
  names = [t for t in req.tasks.split(",") if t]
  vocab = vocabularies.for_evaluation(loaded.tokenizer, loaded.model_cfg.vocab_size,
                                     req.pool)
  dev = task_splits.load_split(names, "dev", req.max_examples, vocab)
  task_data.check_context(dev, loaded.model_cfg.max_position_embeddings, "--tasks")
  dev = task_data.place(dev, loaded.mesh)
  score = configurables.make_scorer(transformer.Decoder(loaded.model_cfg))
  scorer = population.CachedScorer(  # one candidate at a time: greedy soups are sequential
      population.jit_population(population.make_population_fn(score, "vmap"), loaded.params,
                                loaded.mesh), loaded.params, 1)
  single = scorer(np.eye(len(loaded.params), dtype=np.float32), dev, "dev")
  alphas, soup = kernels.greedy_soup(lambda a: np.mean(scorer(a[None], dev, "dev")[0]),
                                     single.mean(-1))
  return alphas, {"ingredients": [loaded.pool.names[i] for i in soup], "tasks": names}
