"""Every hostile program in escapes.REGISTRY runs in the code sandbox and is contained:
it reads no secret, changes nothing outside, signals nothing outside, reaches no socket,
leaves no process behind, stays within its limits, and does not pass (escapes.breaches).
A new escape is one registry entry, tested here for free."""
import shutil
import tempfile
import time

import pytest

import escapes
from recycle_jax.evaluation.verifiers import sandbox

LIMITS = sandbox.Limits(timeout_s=5, cpu_s=5)
pytestmark = pytest.mark.skipif(sandbox.jail_problem() is not None,
                                reason=f"the jail cannot start here: {sandbox.jail_problem()}")


@pytest.fixture
def host():
  tmp = tempfile.mkdtemp(prefix="rj_escape_")
  h = escapes.make_host(tmp)
  yield h
  h.close()
  shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("name", escapes.REGISTRY.names())
def test_escape_is_contained(name, host):
  escape = escapes.REGISTRY.get(name)
  source, tests, trusted = escapes.program_of(escape, host)
  start = time.monotonic()
  out = sandbox.run_program(sandbox.Program(source, tests, trusted), LIMITS)
  seconds = time.monotonic() - start
  assert escapes.breaches(escape, host, out, seconds, LIMITS.timeout_s) == [], out


def test_the_registry_covers_every_kind_of_escape():
  """The kinds of escape found against the sandbox: a kind emptied here shows."""
  kinds = {e.category for e in escapes.REGISTRY.values()}
  assert kinds == {"read", "write", "process", "signal", "socket", "limits", "native", "exec",
                   "verdict"}
  assert len(escapes.REGISTRY) >= 45
