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

from recycle_jax import (baselines, evaluation, multihost, pareto, partitioning, population,
                         search, spaces)


def _edge(fn_or_cls):
  """Registered under its own name and module, as the decorators it replaces were."""
  return gin.external_configurable(fn_or_cls, module=fn_or_cls.__module__)


make_mesh = _edge(partitioning.make_mesh)
param_shardings = _edge(partitioning.param_shardings)
choose_mode = _edge(population.choose_mode)
make_scorer = _edge(evaluation.make_scorer)
make_space = _edge(spaces.make_space)
task_vector_baselines = _edge(baselines.task_vector_baselines)
initialize = _edge(multihost.initialize)
SearchConfig = _edge(search.SearchConfig)
SweepConfig = _edge(pareto.SweepConfig)
