"""Shared fixtures: a micro pool of real Orbax checkpoints, built once per session."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from recycle_jax.tasks import builtin  # noqa: E402

builtin.register()  # what the entry points do before they read a task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_GIN = os.path.join(ROOT, "gin_configs", "pools", "micro.gin")


@pytest.fixture(scope="session")
def micro_pool(tmp_path_factory) -> str:
  """Path of pool.json of 3 tiny checkpoints fine-tuned for seconds from one base."""
  from recycle_jax import cli
  workdir = tmp_path_factory.mktemp("micro_pool")
  assert cli.main(["make-pool", f"--gin_file={MICRO_GIN}", f"--workdir={workdir}"]) == 0
  return str(workdir / "pool.json")


@pytest.fixture(scope="session")
def micro_search(micro_pool, tmp_path_factory):
  """Workdir of a finished quick search (`search_args`) on the micro pool, one process."""
  from recycle_jax import cli
  workdir = tmp_path_factory.mktemp("search") / "run"
  assert cli.main(search_args(micro_pool, workdir)) == 0
  return workdir


def search_args(pool: str, workdir, *extra, budget: int = 14) -> list[str]:
  """CLI args for a quick search on the micro pool."""
  return ["search", f"--workdir={workdir}",
          f"--gin_bindings=Experiment.pool={pool!r}",
          "--gin_bindings=Experiment.tasks=['rj_code', 'rj_knowledge']",
          "--gin_bindings=Experiment.report_tasks=['rj_math']",
          "--gin_bindings=Experiment.max_examples=16",
          f"--gin_bindings=SearchConfig.budget={budget}", *extra]
