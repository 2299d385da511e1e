"""`make demo`: build the embedded pool (cached), then one 2-task search into runs/demo.

The search is the paper reproduction's run of the same setting (same budget and seed),
so runs/demo equals runs/paper/code_instruct from experiments/reproduce_paper.py.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--pool_dir", default="runs/pool")
  p.add_argument("--setting", default="gin_configs/settings/code_instruct.gin")
  p.add_argument("--budget", type=int, default=96, help="merges the search evaluates")
  args = p.parse_args()
  from recycle_jax import cli
  from recycle_jax.runtime import quiet
  os.chdir(ROOT)
  quiet.NativeFilter().start()  # stderr: the project's own lines only, as the CLI's
  rc = cli.main(["make-pool", "--gin_file=gin_configs/pools/demo.gin",
                 f"--workdir={args.pool_dir}"])
  if rc:
    return rc
  rc = cli.main(["search", f"--gin_file={args.setting}", f"--workdir={args.workdir}",
                 "--overwrite", f"--gin_bindings=Experiment.pool='{args.pool_dir}/pool.json'",
                 f"--gin_bindings=SearchConfig.budget={args.budget}"])
  if rc == 0:
    print(f"\nDemo report: {os.path.join(args.workdir, 'report.md')}"
          f"\nPool report: {os.path.join(args.pool_dir, 'pool_report.md')}")
  return rc


if __name__ == "__main__":
  sys.exit(main())
