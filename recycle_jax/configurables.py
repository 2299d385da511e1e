"""The gin edge: every configurable of the library, registered once, under the names gin
files and `--gin_bindings` use (`make_mesh.model`, `SearchConfig.budget`, ...).

t5x style: library functions take their arguments and import no gin; `cli` and
`experiment` call these wrappers to build the objects (mesh, shardings, search and sweep
configs, scorer, merge space, baselines) once per run, outside any jitted function.
Importing this module touches no device, so `--distributed` can join the cluster after
the one parse of the config (cli).
"""
from __future__ import annotations

import gin

from typing import Any, Iterator, Sequence

from recycle_jax.evaluation import scorers
from recycle_jax.merging import spaces
from recycle_jax.models import partitioning, transformer
from recycle_jax.runtime import multihost, validation
from recycle_jax.search import baselines, loop, pareto, population
from recycle_jax.tasks import harness, spec


EDGE: list = []  # (configurable, the object it wraps): what check_bindings reads


def _edge(fn_or_cls):
  """Registered under its own name and module, as the decorators it replaces were."""
  configurable = gin.external_configurable(fn_or_cls, module=fn_or_cls.__module__)
  EDGE.append((configurable, fn_or_cls))
  return configurable


def _jsonl_tasks(tasks: Sequence[spec.JsonlTask] = ()) -> list[str]:
  """Registers the JsonlTasks bound in gin (`jsonl_tasks.tasks = [@qa/JsonlTask()]`)."""
  from recycle_jax.tasks import jsonl  # seqio, TensorFlow: only when tasks are declared
  return jsonl.register_all(tasks)


_jsonl_tasks.__name__ = _jsonl_tasks.__qualname__ = "jsonl_tasks"


make_mesh = _edge(partitioning.make_mesh)
param_shardings = _edge(partitioning.param_shardings)
choose_mode = _edge(population.choose_mode)
make_scorer = _edge(scorers.make_scorer)
make_space = _edge(spaces.make_space)
task_vector_baselines = _edge(baselines.task_vector_baselines)
training_run_weights = _edge(baselines.training_run_weights)
initialize = _edge(multihost.initialize)
SearchConfig = _edge(loop.SearchConfig)
SweepConfig = _edge(pareto.SweepConfig)
ModelConfig = _edge(transformer.ModelConfig)
JsonlTask = _edge(spec.JsonlTask)
jsonl_tasks = _edge(_jsonl_tasks)
LmEvalOptions = _edge(harness.LmEvalOptions)


def bindings(others: Sequence = ()) -> Iterator[tuple[str, Any, Any]]:
  """(Configurable.parameter, value, annotation) of every unscoped gin binding of the
  configurables registered here and of `others` (the edge modules' own), read through
  gin's public `get_bindings` by selector."""
  for wrapped in [w for _, w in EDGE] + [getattr(o, "__wrapped__", o) for o in others]:
    hints = validation.hints(wrapped)
    selector = f"{wrapped.__module__}.{wrapped.__name__}"
    for param, value in gin.get_bindings(selector, resolve_references=False).items():
      yield f"{wrapped.__name__}.{param}", value, hints.get(param, Any)


def check_bindings(others: Sequence = ()) -> None:
  """Every gin binding: of its parameter's type, and in its registered range."""
  for name, value, hint in bindings(others):
    validation.check_binding(name, value, hint)
