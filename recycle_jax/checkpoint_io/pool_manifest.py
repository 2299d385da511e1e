"""Pools: the manifest (pool.json: names and paths, relative to it), a pool given as a
list of (name, path) or as a mergekit config's models (`load_pool`), and content
fingerprints of its members (what `--resume` compares).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence


from recycle_jax.runtime import outputs
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import check

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  path: str  # absolute
  info: dict = dataclasses.field(default_factory=dict, compare=False)  # recipe, scores

  @property
  def subtree(self) -> tuple[str, ...]:
    """Where its tree keeps the parameters (a training run's train state: training_run)."""
    return tuple(self.info.get("subtree") or ())


@dataclasses.dataclass(frozen=True)
class Pool:
  entries: tuple[Entry, ...]
  source: str = "<gin>"

  @property
  def names(self) -> list[str]:
    return [e.name for e in self.entries]

  @property
  def paths(self) -> list[str]:
    return [e.path for e in self.entries]

  @property
  def steps(self) -> list[int] | None:
    """The training steps of a training run's pool (`training_run`), else None."""
    steps = [e.info.get("step") for e in self.entries]
    return None if None in steps else steps

  def fingerprints(self) -> dict[str, str]:
    """{'pool[NAME]': content fingerprint} of every member (see `fingerprint`)."""
    return {f"pool[{e.name}]": fingerprint(e.path) for e in self.entries}

  def __len__(self) -> int:
    return len(self.entries)

  def cached_scores(self, split: str) -> dict[str, dict[str, float]] | None:
    """{name: {task: score}} from the manifest, or None when any entry lacks them."""
    out = {}
    for e in self.entries:
      s = e.info.get("scores", {}).get(split)
      if s is None:
        return None
      out[e.name] = s
    return out


def _short(value) -> str:
  r = repr(value)
  return r if len(r) <= 40 else f"{r[:30]}... ({len(r)} characters)"


def read_manifest(path: str) -> Pool:
  check(os.path.isfile(path), "pool manifest not found", path,
        "pass --pool=DIR/pool.json (run `recycle-jax make-pool` to build one)")
  fix = 'write {"checkpoints": [{"name": ..., "path": ...}, ...]}'
  data = validation.load_json(path, "pool manifest", fix)
  items = data.get("checkpoints") if isinstance(data, dict) else None
  check(isinstance(items, list) and items, "pool manifest has no 'checkpoints' list", path,
        fix)
  base = os.path.dirname(os.path.abspath(path))
  entries = []
  for i, item in enumerate(items):
    where = f"{path}, checkpoint {i}"
    check(isinstance(item, dict) and "name" in item and "path" in item,
          f"pool entry {i} needs 'name' and 'path'", path, fix)
    for key in ("name", "path"):
      value = item[key]
      check(isinstance(value, str) and 0 < len(value.strip()) <= MAX_FIELD,
            f"{key} is {_short(value)}, not a string of 1 to {MAX_FIELD} characters", where,
            f"write its {key} as a string")
    scores = item.get("scores", {})
    check(isinstance(scores, dict) and all(
        isinstance(s, dict) and all(v is None or (isinstance(v, (int, float)) and
                                                  not isinstance(v, bool)) for v in s.values())
        for s in scores.values()), "scores are not {split: {task: number}}", where,
          "remove them (`recycle-jax make-pool` rewrites them)")
    info = {k: v for k, v in item.items() if k not in ("name", "path")}
    entries.append(Entry(item["name"], os.path.normpath(os.path.join(base, item["path"])),
                         info))
  return make_pool(entries, source=path)


def make_pool(entries: Sequence[Entry], source: str = "<gin>") -> Pool:
  names = [e.name for e in entries]
  dup = {n for n in names if names.count(n) > 1}
  check(not dup, f"duplicate checkpoint names {sorted(dup)}", source, "give every checkpoint a unique name")
  check(len(entries) >= 1, "the pool is empty", source)
  seen: dict[str, str] = {}
  for e in entries:  # one checkpoint twice would silently double its weight
    key = os.path.realpath(e.path)
    check(key not in seen, f"checkpoints {seen.get(key)!r} and {e.name!r} are the same "
          f"directory {e.path}", source, "list every checkpoint once")
    seen[key] = e.name
  return Pool(tuple(entries), source)


def load_pool(pool: str | Sequence, steps: str | None = None) -> Pool:
  """A manifest path (`pool.json` or its directory), a mergekit config (its models besides
  the base), a gin list of (name, path), or with `steps` a training run's directory and
  its step selection (`training_run`)."""
  from recycle_jax.checkpoint_io import mergekit_config, training_run
  if steps is not None:
    check(isinstance(pool, str) and not os.path.isfile(pool), "--steps selects the steps of "
          "a training run's directory, not of a manifest or a list", training_run.FLAG,
          "pass --pool=RUN_DIR (a CheckpointManager directory), or drop --steps")
    return make_pool([Entry(*e) for e in training_run.run_entries(pool, steps)], pool)
  if isinstance(pool, str) and os.path.isdir(pool) and \
      not os.path.exists(os.path.join(pool, "pool.json")):
    found = training_run.find_steps(pool)
    check(not found, f"a training run's directory ({training_run.describe(sorted(found))}) "
          "needs a step selection", pool, f"pass --steps ({training_run.SYNTAX}), "
          "e.g. --steps=last:8")
  if mergekit_config.is_config(pool):
    return make_pool([Entry(n, p) for n, p in mergekit_config.pool_and_base(pool)[0]], pool)
  if isinstance(pool, str):
    if os.path.isdir(pool):
      pool = os.path.join(pool, "pool.json")
    return read_manifest(pool)
  return make_pool([Entry(n, os.path.abspath(p)) for n, p in pool])


def write_manifest(path: str, pool: Pool) -> None:
  base = os.path.dirname(os.path.abspath(path))
  items = [{"name": e.name, "path": os.path.relpath(e.path, base), **e.info}
           for e in pool.entries]
  outputs.write_text(path, json.dumps({"checkpoints": items}, indent=1))


MAX_FIELD = 1024  # characters of a name or path in a manifest


SMALL_FILE = 1 << 16  # files up to this size are hashed whole (metadata, configs, indexes)


def fingerprint(path: str) -> str:
  """A checkpoint's content, cheaply: sha256 over every file's relative path, size and
  modification time, and the bytes of its small files (Orbax and Hugging Face metadata,
  configs, indexes, tokenizers). A member replaced, re-saved or edited gets another."""
  h = hashlib.sha256()
  for d, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(d, f)
      st = os.stat(p)
      h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
      if st.st_size <= SMALL_FILE:
        with open(p, "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()[:16]
