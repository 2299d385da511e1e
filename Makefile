# `make demo` and `make test` install the pinned stack into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: install demo test test-slow test-faults bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) experiments/demo.py --workdir=runs/demo

# `make test` (under 15 min on 2 cores): every test but those marked slow (two-process
# runs, real signals and kills, end-to-end CLI runs and sweeps), and one generated fault
# case per (command, kind of fault).
# `make test-slow` runs the slow ones, `make test-faults` every fault case; CI runs all three.
test: install
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

test-faults: install
	RJ_FAULTS=all $(PY) -m pytest -q tests/reliability/test_faults.py

bench: install
	$(PY) benchmarks/search_throughput.py

clean:
	rm -rf runs
