"""Submits a sweep through XManager (local executor): one job per trial.

  .venv/bin/python experiments/launch_xmanager.py --sweep=NAME_OR_FILE --workdir=W

Same trials and arguments as experiments/sweep.py; needs `pip install xmanager`.
Aggregate afterwards with `experiments/sweep.py` (it skips the finished trials).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recycle_jax import sweeps  # noqa: E402
from recycle_jax.runtime.errors import UserError  # noqa: E402
from sweep import parse_args  # noqa: E402  (experiments/ is this script's directory)

MISSING = ("error: the xmanager package is not installed; `pip install xmanager`, "
           "or run the same sweep locally with experiments/sweep.py")


def launch(spec: sweeps.SweepSpec, workdir: str, title: str) -> None:
  from xmanager import xm, xm_local
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([xm.binary(
        executor_spec=xm_local.Local.Spec(), path=sys.executable,
        args=["-m", "recycle_jax.cli"], env_vars={"PYTHONPATH": sweeps.ROOT})])
    for k, trial in enumerate(spec.trials):
      if not sweeps.is_done(workdir, k):
        out = sweeps.trial_dir(workdir, k)
        experiment.add(xm.Job(executable=executable, executor=xm_local.Local(),
                              args=sweeps.trial_args(spec, trial, out)))


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import xmanager  # noqa: F401
  except ImportError:
    print(MISSING, file=sys.stderr)
    return 2
  try:
    spec = sweeps.load_spec(args.sweep, args.gin_bindings)
    os.makedirs(args.workdir, exist_ok=True)
    sweeps.record_spec(spec, args.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  launch(spec, os.path.abspath(args.workdir), f"recycle_jax {os.path.basename(args.sweep)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
