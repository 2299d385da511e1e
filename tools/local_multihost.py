"""Run a `recycle-jax` command as K processes on this machine, the way each host of a pod
or cluster runs it: one process per "host", D CPU devices each, gloo collectives, one
coordinator on localhost. For trying multi-host runs (and their bugs) without a cluster.

  python tools/local_multihost.py --processes=2 --devices=4 -- \\
      merge --pool=runs/pool/pool.json --weights=1,1,1 --output=/tmp/merged

Every process gets `--distributed` and JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID / JAX_NUM_CPU_DEVICES, exactly what `recycle_jax.runtime.multihost.initialize`
reads on a real cluster. Output lines are prefixed `[i]`; the exit status is the first
non-zero one.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(port: int, process_id: int, processes: int = 2, devices: int = 4,
                base: dict | None = None) -> dict:
  """The environment of process `process_id` of `processes` (XLA_FLAGS dropped: it would
  fake another device count)."""
  env = {k: v for k, v in (os.environ if base is None else base).items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(process_id),
             JAX_NUM_CPU_DEVICES=str(devices),
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
  return env


def launch(argv: list[str], processes: int = 2, devices: int = 4, **popen) -> list[subprocess.Popen]:
  """Starts `argv` (a full command line) once per process, sharing one coordinator."""
  port = free_port()
  return [subprocess.Popen(argv, env=process_env(port, i, processes, devices), cwd=ROOT,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
          for i in range(processes)]


def _relay(i: int, proc: subprocess.Popen) -> None:
  for line in proc.stdout:
    sys.stdout.write(f"[{i}] {line}")
    sys.stdout.flush()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              usage="%(prog)s [--processes K] [--devices D] -- COMMAND ARGS...")
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
  p.add_argument("command", nargs=argparse.REMAINDER, help="a recycle-jax subcommand and its flags")
  args = p.parse_args(argv)
  command = [a for a in args.command if a != "--"]
  if not command or args.processes < 1 or args.devices < 1:
    print("error: nothing to run (tools/local_multihost.py); pass `-- SUBCOMMAND ...` and "
          "positive --processes/--devices", file=sys.stderr)
    return 2
  procs = launch([sys.executable, "-m", "recycle_jax.cli", *command, "--distributed"],
                 args.processes, args.devices)
  relays = [threading.Thread(target=_relay, args=(i, pr)) for i, pr in enumerate(procs)]
  for t in relays:
    t.start()
  try:
    codes = [pr.wait() for pr in procs]
  except KeyboardInterrupt:
    for pr in procs:
      pr.kill()
    raise
  for t in relays:
    t.join()
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
