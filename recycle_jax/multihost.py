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

import os

import jax
from absl import logging

from recycle_jax.errors import UserError


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
