"""Strategies x seeds on the micro pool (quick). Bind the pool on the command line:

  .venv/bin/python experiments/sweep.py --sweep=micro --workdir=runs/sweep_micro \
      --gin_bindings="Experiment.pool='runs/micro_pool/pool.json'"
"""
from recycle_jax.sweeps import product, sweep, zipit

BINDINGS = [
    "Experiment.tasks=['rj_code', 'rj_knowledge']",
    "Experiment.report_tasks=['rj_math']",
    "Experiment.max_examples=16",
    "SearchConfig.budget=24",
]
TRIALS = product(
    sweep("SearchConfig.strategy", ["CMA_ES", "SNES"]),
    zipit(sweep("SearchConfig.seed", [0, 1]), sweep("SearchConfig.sigma_init", [1.0, 0.5])),
)
