"""Which hardware this process runs on: one record for the first log line of every command
and for every results.json (`describe`), and `--require_backend`'s check (`require`).

Calling either initializes JAX's backends: under `--distributed`, only after
`jax.distributed.initialize()`.
"""
from __future__ import annotations

from recycle_jax.runtime.errors import check

BACKENDS = ("tpu", "gpu", "cpu")  # jax.default_backend()'s names (ROCm is 'gpu' too)


def describe() -> dict:
  """{backend, device_kind, device_count, local_device_count, process_count, jax_version,
  jaxlib_version} of the default backend."""
  import importlib.metadata
  import jax
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(), "jax_version": jax.__version__,
          "jaxlib_version": importlib.metadata.version("jaxlib")}


def summary(info: dict | None = None) -> str:
  """'backend cpu: 8 x cpu, 1 process, jax 0.10.2' (the first info line's tail)."""
  d = info or describe()
  procs = d["process_count"]
  return (f"backend {d['backend']}: {d['device_count']} x {d['device_kind']}, "
          f"{procs} process{'es' if procs != 1 else ''}, jax {d['jax_version']}")


def require(wanted: str | None, info: dict | None = None) -> None:
  """Refuses to run on another backend than `wanted` (None: any)."""
  if not wanted:
    return
  d = info or describe()
  check(d["backend"] == wanted,
        f"the backend is {d['backend']} ({d['device_count']} x {d['device_kind']}), "
        f"not {wanted}", "--require_backend",
        f"install jax for {wanted} (see the README's install section) or drop the flag")
