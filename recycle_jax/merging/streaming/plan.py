"""The streaming merge's plan: leaves, the units each is read and written in (a run of
stored chunks, sized by the memory budget), and batches of units."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import jax
import numpy as np

from recycle_jax.models.partitioning import path_str

ACC_BYTES = 4  # float32 accumulator


@dataclasses.dataclass(frozen=True)
class Leaf:
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  write_shape: tuple[int, ...]  # stored chunk shape in the first checkpoint

  @property
  def name(self) -> str:  # Orbax's parameter name, also the array's path on disk
    return ".".join(self.keys)

  @property
  def path(self) -> str:  # as everywhere else in recycle_jax (messages, rules)
    return "/".join(self.keys)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize



def leaves_of(abstract, write_shapes: dict[str, Sequence[int]]) -> list[Leaf]:
  """Leaves of a metadata tree, with stored chunk shapes (`write_shapes` by Orbax name)."""
  out = []
  for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    keys = tuple(path_str(p).split("/"))
    shape = tuple(x.shape)
    ws = write_shapes.get(".".join(keys))
    ws = tuple(ws) if ws and len(ws) == len(shape) else shape
    out.append(Leaf(keys, shape, np.dtype(x.dtype), tuple(max(1, c) for c in ws)))
  return out


def unit_shape(leaf: Leaf, max_bytes: int) -> tuple[int, ...]:
  """Shape of a unit: the piece of a leaf read from every input, summed and written as one
  output chunk. It is the stored chunk shape with leading dimensions cut down until a
  float32 unit fits `max_bytes` (>= 1 element): dimensions before the cut one are 1, the
  cut one takes what fits (whole chunks when one fits), later ones are whole. So a unit
  is one contiguous run of a stored chunk, or of a few stored chunks along one axis."""
  if not leaf.shape:
    return ()
  chunk = leaf.write_shape
  for d in range(len(chunk)):
    inner = ACC_BYTES * math.prod(chunk[d + 1:])
    if inner <= max_bytes or d == len(chunk) - 1:
      fit = max(1, max_bytes // inner)
      n = fit // chunk[d] * chunk[d] if fit >= chunk[d] else fit
      n = min(n, max(chunk[d], leaf.shape[d]))  # no longer than the leaf, or one chunk
      return (1,) * d + (max(1, n),) + tuple(chunk[d + 1:])
  raise AssertionError("unreachable")


def units(leaf: Leaf, ushape: Sequence[int]) -> list[tuple[int, ...]]:
  """Origins of the units covering the leaf, in C order (`()` for a scalar)."""
  grid = [range(0, n, u) for n, u in zip(leaf.shape, ushape)]
  return [tuple(o) for o in itertools.product(*grid)] if all(leaf.shape) else (
      [] if leaf.shape else [()])


def region(leaf: Leaf, ushape: Sequence[int], origin: Sequence[int]) -> tuple[slice, ...]:
  """The part of the leaf a unit covers (units at the far edge are cut by the shape)."""
  return tuple(slice(o, min(o + u, n)) for o, u, n in zip(origin, ushape, leaf.shape))


def crop(ushape: Sequence[int], reg: Sequence[slice]) -> tuple[slice, ...]:
  """The valid part of a unit-shaped buffer."""
  return tuple(slice(0, r.stop - r.start) for r in reg)


def batches(leaf: Leaf, ushape: Sequence[int], max_bytes: int) -> list[list[tuple]]:
  """Units of a leaf grouped into batches of at most `max_bytes` of float32 (>= 1 unit):
  a batch is read from every input in turn and summed in one accumulator."""
  per = max(1, max_bytes // max(1, ACC_BYTES * math.prod(ushape)))
  us = units(leaf, ushape)
  return [us[i:i + per] for i in range(0, len(us), per)]
