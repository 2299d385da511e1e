"""The edge's validators: every shipped gin config passes them (no valid value refused),
every registered bound refuses what it must and keeps what it must."""
import glob
import math
import os

import gin
import pytest

import faults
from recycle_jax import configurables
from recycle_jax.runtime import validation
from recycle_jax.runtime.errors import UserError
from reliability_util import ROOT

GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "gin_configs", "**", "*.gin"), recursive=True))


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_gin_configs_pass_the_binding_checks(path):
  faults.import_all()
  gin.clear_config()
  try:
    gin.parse_config_file(path, skip_unknown=False)
    configurables.check_bindings()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name", sorted(validation.BOUNDS))
def test_bounds_refuse_their_bad_values_by_name(name):
  bound = validation.BOUNDS[name]
  for v in bound.bad_values():
    with pytest.raises(UserError, match=f"\\({name}\\)"):
      bound.check(v, name)
  good = bound.lo if bound.lo is not None and not bound.lo_open else (
      (bound.lo or 0) + 1 if bound.hi is None or (bound.lo or 0) + 1 <= bound.hi else bound.hi)
  bound.check(bound.kind(good), name)


@pytest.mark.parametrize("weights,signed,needle", [
    ([1, 1], False, "got 2 weights for a pool of 3"),
    ([1, 1, 1, 1], False, "got 4 weights for a pool of 3"),
    ([math.nan, 1, 1], False, "not finite"), ([math.inf, 1, 1], True, "not finite"),
    ([-1, 1, 1], False, "negative weight -1"), ([0, 0, 0], False, "all weights are zero")])
def test_weight_lists(weights, signed, needle):
  with pytest.raises(UserError, match=needle):
    validation.check_weights(weights, 3, "--weights", signed=signed)
  assert validation.check_weights([-1, 2, 0.5], 3, "--weights", signed=True) == [-1, 2, 0.5]
