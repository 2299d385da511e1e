"""`JsonlTask`: the record that describes a task over JSON-lines files (see `tasks.jsonl`,
which validates and registers it). Plain data, no seqio: gin builds it at the edge
(`configurables`) before anything heavy is imported."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class JsonlTask:
  name: str
  splits: Mapping[str, str]
  prompt: str
  kind: str = "generate"
  target: str | Mapping[str, str] | None = None
  answer: str | None = None
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  choices: str | None = None
  label: str | None = None
  verifier: str | None = None
  few_shot: int = 0
  few_shot_split: str = "train"
  separator: str = "\n\n"
  seed: int = 0
  chat_template: bool = False
  max_new_tokens: int = 32
  stop: Sequence[str] = ()
  metric: str | None = None
  target_delimiter: str = " "
  verifier_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
  id: str | None = None
