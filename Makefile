# `make demo` and `make test` install the pinned stack into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: install demo test test-faults bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) experiments/demo.py --workdir=runs/demo

# A stratified sample of the generated fault cases (every command meets every kind of
# fault); `make test-faults` runs all of them (CI runs both).
test: install
	$(PY) -m pytest -q tests

test-faults: install
	RJ_FAULTS=all $(PY) -m pytest -q tests/reliability/test_faults.py

bench: install
	$(PY) benchmarks/search_throughput.py

clean:
	rm -rf runs
