# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
# Each bootstraps .venv on first use: `make demo` with the runtime requirements only
# (requirements.txt), `make test` with the test ones as well (requirements-test.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed

.PHONY: test test-fast demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): requirements.txt requirements-test.txt | $(PY)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(RUNTIME_STAMP) $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=20 tests

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

demo: $(RUNTIME_STAMP)
	$(PY) -m launch.demo --out out/demo

clean:
	rm -rf $(VENV) out build *.egg-info
