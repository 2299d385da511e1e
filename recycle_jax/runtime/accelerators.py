"""Published per-chip figures of the accelerators `recycle-jax plan` and the device
benchmark know: peak dense bf16 FLOP/s, HBM size and HBM bandwidth.

The figures are the vendors' datasheet numbers (per chip; for GPUs the SXM parts, dense
without sparsity), used for roofline bounds and model FLOP utilisation, never as
measurements. `usable` is the fraction of HBM a plan may fill: the rest is left to the
runtime, XLA's own buffers and fragmentation.
"""
from __future__ import annotations

import dataclasses

from recycle_jax.runtime import registry


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str  # --device_kind
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes: int  # per chip
  hbm_bandwidth: float  # bytes/s per chip
  kinds: tuple[str, ...]  # substrings of jax's device_kind that mean this chip (lowercase)
  usable: float = 0.9

  @property
  def usable_bytes(self) -> int:
    return int(self.hbm_bytes * self.usable)


GiB = 2**30
REGISTRY: registry.Registry[Accelerator] = registry.Registry("device kind", "--device_kind")
for _a in (
    Accelerator("v4", 275e12, 32 * GiB, 1.2e12, ("tpu v4",)),
    Accelerator("v5e", 197e12, 16 * GiB, 8.19e11, ("tpu v5 lite", "tpu v5e")),
    Accelerator("v5p", 459e12, 95 * GiB, 2.765e12, ("tpu v5p", "tpu v5")),
    Accelerator("v6e", 918e12, 32 * GiB, 1.64e12, ("tpu v6 lite", "tpu v6e")),
    Accelerator("a100", 312e12, 80 * GiB, 2.039e12, ("a100",)),
    Accelerator("h100", 989e12, 80 * GiB, 3.35e12, ("h100",)),
    Accelerator("h200", 989e12, 141 * 10**9, 4.8e12, ("h200",)),
):
  REGISTRY.register(_a)


def get(name: str) -> Accelerator:
  """The table's entry for --device_kind (case-insensitive); unknown: one error line."""
  return REGISTRY.get(str(name).lower(), "--device_kind")


def of_device_kind(device_kind: str) -> Accelerator | None:
  """The entry for jax's `device.device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'),
  or None (CPU, or a chip not in the table)."""
  kind = device_kind.lower()
  for a in REGISTRY.values():  # 'tpu v5p' before 'tpu v5': the first match wins
    if any(k in kind for k in a.kinds):
      return a
  return None
