"""A training run's own checkpoints as a pool: the search over its last 8 steps against
the final checkpoint, LAWA, EMA and the same run with its learning rate decayed.

  python experiments/training_run_pool.py --workdir=runs/training_run \
      [--base=runs/pool/base] [--steps=240 --every=20 --lr=1e-3] [--num_seeds=5]
      [--setting=code_instruct] [--train_seeds=7,8,9] [--gin_bindings=Experiment.max_examples=64]

1. The demo's base run (gin_configs/pools/demo.gin: its general mixture, batch, length)
   continued from its checkpoint (`--base`, the demo pool's `base`; built by `make-pool`
   when absent) at a constant learning rate (`--lr` after 10 warmup steps) for `--steps`
   steps; every `--every` steps a checkpoint is written by a real Orbax CheckpointManager
   in MaxText's layout (W/run/<step>/items: params and the Adam moments).
2. The same run with its learning rate decayed: branched at the start of the last 8
   checkpoints' window (step S - 8 * every) with the optimizer state it had there, the
   same batches, the rate decaying linearly to 0 at step S (warmup-stable-decay).
3. `recycle-jax search --pool=W/run --steps=last:8` with the setting's held-in and
   held-out tasks, K seeds; LAWA (last `--lawa_k`) and EMA (`--ema_decay` per checkpoint)
   are its baselines; the decayed run's final checkpoint is scored on the same splits.
W/summary.md: the table (test, mean ± 95% CI over seeds; paired differences of the
search against each); W/training_run.png: held-in and held-out test score of every step,
with the merges and the decayed run.
"""
import argparse
import functools
import json
import os
import sys
import time

import numpy as np

import runner  # noqa: E402  (experiments/runner.py; puts the repo on sys.path)
from recycle_jax.reporting import statistics  # noqa: E402

DEMO_GIN = os.path.join(runner.ROOT, "gin_configs", "pools", "demo.gin")
WINDOW = 8  # checkpoints the search pools: the last 8
WARMUP = 10


@functools.lru_cache(maxsize=1)
def demo_training() -> dict:
  """The demo base run's data and shapes, as demo.gin binds them (its one base stage
  trains on the GENERAL mixture); read once per process."""
  import gin
  from recycle_jax import configurables, pools  # noqa: F401 (registers the configurables)
  gin.parse_config_file(DEMO_GIN, skip_unknown=True)
  return {"mix": dict(gin.query_parameter("%GENERAL")),  # the base stage's mixture
          "seq_len": gin.query_parameter("make_pool.seq_len"),
          "batch": gin.query_parameter("make_pool.batch_size")}


def train_run(base: str, workdir: str, steps: int, every: int, lr: float, seed: int) -> dict:
  """W/run (a CheckpointManager's steps) and W/decay (the decayed branch's final
  checkpoint); skipped when W/run_done.json records the same arguments."""
  args = {"base": os.path.abspath(base), "steps": steps, "every": every, "lr": lr,
          "seed": seed, "window": WINDOW, "warmup": WARMUP}
  done = os.path.join(workdir, "run_done.json")
  if os.path.exists(done) and json.load(open(done)).get("args") == args:
    return json.load(open(done))
  import jax
  from recycle_jax import pools
  from recycle_jax.checkpoint_io import checkpoints, tokenizer_files, training_run
  from recycle_jax.models import training, transformer
  check = steps % every == 0 and steps // every >= WINDOW
  assert check, f"--steps must be a multiple of --every with >= {WINDOW} checkpoints"
  demo = demo_training()
  params, meta = checkpoints.restore_local(base)
  cfg = transformer.ModelConfig(**meta.model_config)
  custom = {"recycle_jax": {"model": cfg.to_dict(), "vocabulary": tokenizer_files.BYTE.describe(),
                            "run": args}}
  apply = transformer.Decoder(cfg).apply
  tcfg = training.TrainConfig(batch_size=demo["batch"])
  opt = training.init_opt_state(params, tcfg)
  batches = pools.Sampler(demo["mix"], demo["seq_len"], demo["batch"], seed)
  branch_at, kept, losses = steps - WINDOW * every, [], []
  branch = None
  for d in ("run", "decay"):
    assert not os.path.exists(os.path.join(workdir, d)), f"{workdir}/{d} exists: remove it"
  mngr = training_run.open_run(os.path.join(workdir, "run"))
  t0 = time.time()
  for i in range(steps):
    if i == branch_at:
      branch = jax.tree.map(np.array, (params, opt))  # copies: the step donates opt
    batch = next(batches)
    if i >= branch_at:
      kept.append(batch)
    rate = lr * min(1.0, (i + 1) / WARMUP)
    params, opt, loss = training.train_step(apply, tcfg, params, opt, batch, rate)
    losses.append(loss)
    if (i + 1) % every == 0:
      moments = {"mu": _moment(opt, "mu"), "nu": _moment(opt, "nu")}
      training_run.save_step(mngr, i + 1, params, custom, moments)
  mngr.wait_until_finished()
  mngr.close()
  const_s = time.time() - t0
  params, opt = branch
  decay_losses = []
  for j, batch in enumerate(kept):  # the same batches, the rate decaying linearly to 0
    rate = lr * (1.0 - j / len(kept))
    params, opt, loss = training.train_step(apply, tcfg, params, opt, batch, rate)
    decay_losses.append(loss)
  checkpoints.save(os.path.join(workdir, "decay"), params,
                   {**custom["recycle_jax"], "decayed_from": branch_at})
  out = {"args": args, "constant_s": round(const_s, 1), "total_s": round(time.time() - t0, 1),
         "final_loss_constant": round(float(np.mean(losses[-every:])), 4),
         "final_loss_decay": round(float(np.mean(decay_losses[-every:])), 4),
         "branch_at": branch_at}  # losses: the mean over the last `every` steps' batches
  runner.write_summary(workdir, json.dumps(out, indent=1), "run_done.json")
  return out


def _moment(opt_state, name: str):
  import optax
  return optax.tree_utils.tree_get(opt_state, name)


def score_decay(workdir: str, tasks, report_tasks, max_examples) -> dict:
  """The decayed run's final checkpoint on the search's splits: {split: {task: score}}."""
  path = os.path.join(workdir, "decay_scores.json")
  if os.path.exists(path):
    return json.load(open(path))
  from recycle_jax import pools
  from recycle_jax.checkpoint_io import pool_manifest
  pool = pool_manifest.make_pool([pool_manifest.Entry("decay", os.path.join(workdir, "decay"))])
  scores = pools.score_pool(pool, list(tasks) + [t for t in report_tasks if t not in tasks],
                            max_examples)["decay"]
  runner.write_summary(workdir, json.dumps(scores, indent=1), "decay_scores.json")
  return scores


def _avg(scores: dict, tasks) -> float:
  return float(np.mean([scores[t] for t in tasks]))


def rows(cells: list[tuple[dict, dict]]) -> dict[str, dict[str, list[float]]]:
  """{row: {'held_in': [per cell], 'held_out': [...], 'dev': [...]}} on the test split, a
  cell being (a search's results, its run's decayed checkpoint's scores): one per
  (training run, search seed); a run's fixed rows repeat per search seed (paired)."""
  tasks, held_out = cells[0][0]["tasks"], cells[0][0]["report_tasks"]
  out = {}
  scores = {"final checkpoint": lambda r, d: r["pool"][-1]["scores"],
            "decayed run": lambda r, d: d}
  scores.update({m: (lambda r, d, m=m: r["methods"][m]["scores"]) for m in (
      "lawa", "ema", "uniform", "best_single", "greedy_soup", "search")
      if m in cells[0][0]["methods"]})
  for name, get in scores.items():
    got = [get(r, d) for r, d in cells]
    out[name] = {"held_in": [_avg(g["test"], tasks) for g in got],
                 "held_out": [_avg(g["test"], held_out) for g in got],
                 "dev": [_avg(g["dev"], tasks) for g in got]}
  return out


def table(table_rows: dict, cells: list[tuple[dict, dict]], n_runs: int, metas: list[dict]
          ) -> list[str]:
  runs = [r for r, _ in cells]
  tasks, held_out = runs[0]["tasks"], runs[0]["report_tasks"]
  lines = [f"Held-in: {', '.join(tasks)}; held-out: {', '.join(held_out)}; test split; "
           f"mean ± 95% CI over {len(cells)} (training run, search seed) pairs: {n_runs} "
           f"training run(s) x {len(cells) // n_runs} search seed(s).", "",
           "| method | held-in test | held-out test | dev (held-in) | search − method, "
           "held-in (paired) | search − method, held-out (paired) |", "|---|---|---|---|---|---|"]
  s = table_rows["search"]
  for name, r in table_rows.items():
    d_in = statistics.paired(s["held_in"], r["held_in"])
    d_out = statistics.paired(s["held_out"], r["held_out"])
    diff = lambda d: "–" if name == "search" else \
        f"{d['mean']:+.1f} ± {d['ci95']:.1f} ({d['verdict']})"  # noqa: E731
    lines.append(f"| {name} | {statistics.fmt_ci(r['held_in'])} | "
                 f"{statistics.fmt_ci(r['held_out'])} | {statistics.fmt_ci(r['dev'])} | "
                 f"{diff(d_in)} | {diff(d_out)} |")
  names = [p["name"] for p in runs[0]["pool"]]
  lines += ["", f"Pool: {', '.join(names)}. LAWA weights: "
            f"{runner_weights(runs[0], 'lawa', names)}; EMA: {runner_weights(runs[0], 'ema', names)}.",
            "Search weights per pair: " + "; ".join(
                runner_weights(r, "search", names) for r in runs), "",
            "Per task, test (mean over pairs): " + "; ".join(
                f"{m}: " + ", ".join(f"{t} {np.mean([_method(r, d, m)[t] for r, d in cells]):.1f}"
                                     for t in tasks + held_out) for m in table_rows), ""]
  lines += [f"Training: {json.dumps(m)}" for m in metas]
  return lines


def _method(r: dict, d: dict, m: str) -> dict:
  if m == "final checkpoint":
    return r["pool"][-1]["scores"]["test"]
  if m == "decayed run":
    return d["test"]
  return r["methods"][m]["scores"]["test"]


def runner_weights(r: dict, m: str, names) -> str:
  from recycle_jax.reporting import records
  return records.weights_line(r["methods"][m]["weights"], names)


def figure(cells: list[tuple[dict, dict]], table_rows: dict, path: str) -> str:
  """Every step's own test score along the run (mean over the training runs) and the
  merges' and the decayed run's (mean over cells)."""
  from recycle_jax.reporting import figures
  tasks, held_out = cells[0][0]["tasks"], cells[0][0]["report_tasks"]
  runs = list({id(d): r for r, d in cells}.values())  # one search per training run
  steps = [int(p["name"].split("_")[1]) for p in runs[0]["pool"]]
  per_step = {panel: list(np.mean([[_avg(p["scores"]["test"], ts) for p in r["pool"]]
                                   for r in runs], 0))
              for panel, ts in (("held-in", tasks), ("held-out", held_out))}
  merges = {name: {"held-in": float(np.mean(r["held_in"])),
                   "held-out": float(np.mean(r["held_out"]))}
            for name, r in table_rows.items() if name != "final checkpoint"}
  return figures.training_run(steps, per_step, merges, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/training_run")
  p.add_argument("--base", default=None, help="the demo pool's base checkpoint")
  p.add_argument("--pool_workdir", default="runs/pool",
                 help="where make-pool builds the demo pool when --base is not given")
  p.add_argument("--steps", type=int, default=240)
  p.add_argument("--every", type=int, default=20)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--train_seeds", default="7",
                 help="data-order seeds of the continued run: one run each (comma-separated)")
  p.add_argument("--setting", default="code_instruct")
  p.add_argument("--num_seeds", type=int, default=5)
  p.add_argument("--lawa_k", type=int, default=4)
  p.add_argument("--ema_decay", type=float, default=0.5)
  p.add_argument("--gin_bindings", action="append", default=[])
  a = p.parse_args(argv)
  base = a.base
  if base is None:
    from recycle_jax import cli
    rc = cli.main(["make-pool", f"--gin_file={DEMO_GIN}", f"--workdir={a.pool_workdir}"])
    if rc:
      return rc
    base = os.path.join(a.pool_workdir, "base")
  seeds = [int(x) for x in a.train_seeds.split(",")]
  demo_training()  # read once, before a search locks gin's config
  bindings = [f"Experiment.steps='last:{WINDOW}'", f"training_run_weights.lawa_k={a.lawa_k}",
              f"training_run_weights.ema_decay={a.ema_decay}", *a.gin_bindings]
  max_examples = next((int(b.split("=")[1]) for b in a.gin_bindings
                       if b.replace(" ", "").startswith("Experiment.max_examples=")), None)
  cells, metas = [], []
  for seed in seeds:  # one training run each, in its own directory when there are several
    wd = a.workdir if len(seeds) == 1 else os.path.join(a.workdir, f"train_seed_{seed}")
    os.makedirs(wd, exist_ok=True)
    meta = train_run(base, wd, a.steps, a.every, a.lr, seed)
    search_dir = os.path.join(wd, "search")
    if not runner.done(search_dir, a.num_seeds):
      rc = runner.search(a.setting, search_dir, os.path.join(wd, "run"), bindings,
                         [f"--num_seeds={a.num_seeds}"])
      if rc:
        return rc
    runs = runner.seed_results(search_dir)
    cfg = runs[0]["config"]
    metas.append({**meta, "dev_examples": cfg["dev_examples"],
                  "search_wall_s": cfg["search_wall_s"]})
    decay = score_decay(wd, runs[0]["tasks"], runs[0]["report_tasks"], max_examples)
    cells += [(r, decay) for r in runs]
  table_rows = rows(cells)
  fig = figure(cells, table_rows, os.path.join(a.workdir, "training_run.png"))
  text = "\n".join(["# A training run's checkpoints as a pool", "",
                    *table(table_rows, cells, len(seeds), metas), "", f"Figure: {fig}"])
  runner.write_summary(a.workdir, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
