"""What the reproduction scripts share: run one `recycle-jax search`, write a summary."""
import os
import sys
from typing import Callable, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def search(setting: str, workdir: str, pool: str, bindings: Sequence[str] = (),
           flags: Sequence[str] = ()) -> int:
  """`recycle-jax search` with a setting's gin file into `workdir` (overwritten)."""
  from recycle_jax import cli
  gin_file = setting if setting.endswith(".gin") else \
      os.path.join(ROOT, "gin_configs", "settings", f"{setting}.gin")
  return cli.main(["search", f"--gin_file={gin_file}", f"--workdir={workdir}",
                   "--overwrite", f"--gin_bindings=Experiment.pool='{pool}'", *flags] +
                  [f"--gin_bindings={b}" for b in bindings])


def write_summary(workdir: str, text: str) -> str:
  from recycle_jax.checkpoints import atomic_write_text
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "summary.md")
  atomic_write_text(path, text)
  print(f"summary: {path}")
  return path


def run_all(jobs: Iterable[tuple[str, str, Sequence[str], Sequence[str]]], pool: str,
            workdir: str, summary: Callable[[str], str]) -> int:
  """Runs (setting, run workdir, bindings, flags) searches in order, then the summary."""
  for setting, out, bindings, flags in jobs:
    rc = search(setting, out, pool, bindings, flags)
    if rc:
      return rc
  write_summary(workdir, summary(workdir))
  return 0
