"""One process per host: `jax.distributed.initialize` from gin or the environment.

Every host runs the same command with `--distributed`; JAX then sees the global device
set and the mesh spans all hosts. On TPU pods, SLURM and Open MPI JAX finds the
coordinator itself, so nothing needs setting; elsewhere (plain multi-node GPU, CPU tests)
give the coordinator address, the number of processes and this process's id, by gin
(`initialize.coordinator_address = ...`) or by the environment:

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0

CPU processes (tests, laptops) need collectives across processes: gloo is selected, and
`num_cpu_devices` (or JAX_NUM_CPU_DEVICES) fakes several devices per process.
"""
from __future__ import annotations

import itertools
import os

import jax
from absl import logging

from recycle_jax.runtime import waits
from recycle_jax.runtime.errors import UserError


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name} must be an integer, got {value!r}", name) from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, num_cpu_devices: int | None = None,
               local_device_ids: tuple[int, ...] | None = None,
               initialization_timeout: int = 300) -> None:
  """Joins this process to the others; must run before anything touches a JAX device.

  Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID, JAX_NUM_CPU_DEVICES, then from JAX's cluster auto-detection.
  """
  if jax.distributed.is_initialized():
    return
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  num_cpu_devices = (num_cpu_devices if num_cpu_devices is not None
                     else _env_int("JAX_NUM_CPU_DEVICES"))
  # Only affects the CPU backend; without it CPU processes cannot run cross-host programs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids else None,
        initialization_timeout=initialization_timeout)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"could not join the distributed run: {str(e).splitlines()[0][:200]}",
                    "--distributed", "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                    "JAX_PROCESS_ID (or run under a TPU pod, SLURM or Open MPI)") from None
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


# Every process makes the same calls in the same order, so a counter names them alike.
_calls = itertools.count()


def _client():
  from jax._src import distributed  # the coordination service's client: bounded waits
  return distributed.global_state.client


def _bounded(fn, what: str):
  """fn(timeout_ms) of the coordination service; past the bound, one line (waits)."""
  try:
    return fn(max(1, int(waits.limit_s() * 1000)))
  except Exception as e:  # noqa: BLE001 (jax raises its runtime error: DEADLINE_EXCEEDED)
    if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
      raise UserError(f"{what} failed: {str(e).splitlines()[0][:200]}", "--distributed",
                      "check the other processes' logs (one of them failed or exited)"
                      ) from None
    raise waits.stuck_error(f"{what} (process {jax.process_index()} of "
                            f"{jax.process_count()})", "--distributed",
                            "another process failed, exited or hung?",
                            "check the other processes' logs") from None


def barrier(name: str) -> None:
  """Waits until every process reaches this barrier (bounded; nothing on one process)."""
  if jax.process_count() == 1:
    return
  key = f"recycle_jax/{name}/{next(_calls)}"
  _bounded(lambda ms: _client().wait_at_barrier(key, ms), f"the barrier {name!r}")


def broadcast(name: str, value: str) -> str:
  """Process 0's `value` on every process (the others wait for it, bounded)."""
  if jax.process_count() == 1:
    return value
  key = f"recycle_jax/{name}/{next(_calls)}"
  if jax.process_index() == 0:
    _client().key_value_set(key, value)
    return value
  return _bounded(lambda ms: _client().blocking_key_value_get(key, ms),
                  f"waiting for process 0's {name}")
