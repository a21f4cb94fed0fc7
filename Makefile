# `make up` sets up .venv on first use and runs the stack; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
CONFIG ?= configs/default.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup up test test-fast deploy-check bench soak clean status

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to a CPU build in pyproject.toml; install it first so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[all,test,bench]'
	touch $(BENCH_STAMP)

up: $(STAMP)
	$(VENV)/bin/supervisor up --config $(CONFIG) $(ARGS)

status: $(STAMP)
	$(VENV)/bin/supervisor status

# Python keeps its compiled modules and pytest its rewritten tests (a caller's PYTHONDONTWRITEBYTECODE would have
# every test process compile them again)
test test-fast: export PYTHONDONTWRITEBYTECODE :=

# the container tests need a Docker engine: one is installed and started where none answers;
# three pytest workers on two cores (the end-to-end tests wait on deadlines more than they compute: two cores ran
# about two thirds busy with two workers); then the tests that load the host by design, by themselves
test: $(STAMP)
	bash deploy/docker-engine.sh start
	bash deploy/test-tools.sh
	$(PY) -m pytest -n 3 --dist loadgroup -m "not alone and not images" $(PYTEST_ARGS)
	$(PY) -m pytest -m alone tests/e2e $(PYTEST_ARGS)

# The unit tests (tests/<package>/): they start no process (a test that does fails); two workers, fewer fuzz
# examples of each kind, one thread each for torch and numpy; about 20 s.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 FUZZ_SCALE=0.1 $(PY) -m pytest -n 2 --dist worksteal tests --ignore=tests/e2e $(PYTEST_ARGS)

# The worker image of deploy/docker/Dockerfile built offline on a locally made base, then checked: it runs as its
# user, has no torch, and a host of it steps against a learner here (a couple of minutes; CI runs it after the suite)
deploy-check: $(STAMP)
	bash deploy/docker-engine.sh start
	bash deploy/images.sh
	$(PY) -m pytest -m images tests/e2e $(PYTEST_ARGS)

bench: $(BENCH_STAMP)
	$(PY) -m bench $(ARGS)

# At least 20 minutes: SOAK_S (default 600) seconds of random faults every SOAK_EVERY_S (20), then as long without.
soak: $(STAMP)
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) build *.egg-info
