"""The one registry of named plugins (merge methods, strategies, scoring kinds, verifiers,
weight parametrizations, model families, mergekit methods).

Each plugin module holds one `REGISTRY = Registry("what")`: entries are added with
`REGISTRY.register(entry)` (under `entry.name`), looked up with `REGISTRY.get(name, where)`,
which refuses an unknown name in one line listing the choices, and iterated like a
read-only mapping (`name in REGISTRY`, `REGISTRY.items()`), so tests can cover every
entry (a new one is tested for free).
"""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, Mapping, TypeVar

from recycle_jax.runtime.errors import UserError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
  """Named entries in registration order. `what` names an entry in errors."""

  def __init__(self, what: str, where: str = ""):
    self.what, self.where = what, where
    self._entries: dict[str, T] = {}

  def register(self, entry: T, name: str | None = None) -> T:
    """Adds `entry` under `name` (default `entry.name`); a name is registered once."""
    name = entry.name if name is None else name
    if name in self._entries:
      raise UserError(f"{self.what} {name!r} registered twice", self.where or self.what,
                      "give the new entry another name")
    self._entries[name] = entry
    return entry

  def get(self, name: str, where: str | None = None) -> T:  # type: ignore[override]
    """The entry called `name`; an unknown name is one error line with the choices."""
    if name not in self._entries:
      near = difflib.get_close_matches(str(name), list(self._entries), n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise UserError(f"unknown {self.what} {name!r}{hint}", where or self.where or self.what,
                      f"choose from: {', '.join(self._entries)}")
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __getitem__(self, name: str) -> T:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)
