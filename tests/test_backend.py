"""The hardware record (`runtime.backend`): the first info line of every command, every
results.json and eval --output, and --require_backend; the accelerator table."""
import os
import subprocess
import sys

import jax
import pytest

from recycle_jax import cli
from recycle_jax.runtime import accelerators, backend
from recycle_jax.runtime.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_describe_is_this_process():
  d = backend.describe()
  assert d["backend"] == jax.default_backend() == "cpu"
  assert d["device_count"] == len(jax.devices()) and d["process_count"] == 1
  assert d["jax_version"] == jax.__version__ and d["device_kind"] == "cpu"
  assert backend.summary(d) == (f"backend cpu: {len(jax.devices())} x cpu, 1 process, "
                                f"jax {jax.__version__}")


@pytest.mark.parametrize("wanted", ["tpu", "gpu"])
def test_require_refuses_another_backend(wanted):
  with pytest.raises(UserError, match=f"the backend is cpu .* not {wanted}"):
    backend.require(wanted)
  backend.require("cpu")
  backend.require(None)


def test_cli_require_backend_fails_fast_in_one_line(tmp_path, capsys):
  code = cli.main(["report", str(tmp_path), "--require_backend=tpu"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert err[0].startswith("error: the backend is cpu") and "--require_backend" in err[0]


def test_first_info_line_names_the_hardware(tmp_path):
  """A whole process: `report` of a missing results.json still logs the hardware first."""
  proc = subprocess.run([sys.executable, "-m", "recycle_jax.cli", "report", str(tmp_path),
                         "--require_backend=cpu"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
  info = [l for l in proc.stderr.splitlines() if "recycle-jax report on" in l]
  assert info, proc.stderr
  assert f"on backend cpu: 8 x cpu, 1 process, jax {jax.__version__}" in info[0]
  assert proc.returncode == 2  # no results.json


def test_accelerator_table():
  for name, a in accelerators.REGISTRY.items():
    assert accelerators.get(name.upper()) is a
    assert 1e14 < a.peak_flops < 2e15 and 8 * 2**30 <= a.hbm_bytes <= 200 * 2**30
    assert 5e11 < a.hbm_bandwidth < 1e13 and a.usable_bytes < a.hbm_bytes
  assert accelerators.of_device_kind("TPU v5 lite").name == "v5e"
  assert accelerators.of_device_kind("TPU v4").name == "v4"
  assert accelerators.of_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
  assert accelerators.of_device_kind("NVIDIA H200").name == "h200"
  assert accelerators.of_device_kind("cpu") is None
  with pytest.raises(UserError, match="unknown device kind 'b200'.*choose from: v4, v5e"):
    accelerators.get("b200")
