"""recycle_jax: recycle a pool of checkpoints into one merged model (Khalifa et al. 2024).

Layers, low to high: runtime, models, checkpoint_io, merging, evaluation, tasks, search,
reporting; the entry points (cli, experiment, merge_job, pools, sweeps, convert) and the
gin edge (configurables) sit on top. tests/test_layering.py keeps the order."""
