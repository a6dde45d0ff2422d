# nbdserver: `make run` serves the default config, `make test` runs every test.
# Both install what they need first (a virtualenv in .venv, and the Debian
# packages of the real NBD clients the tests drive).

PYTHON ?= python3
# pytest workers: the suite spends much of its time waiting (servers, clients, fsync),
# so two workers on two cores halve it; a fixed number, since a container's core
# count can overstate the CPU it may use.
TEST_JOBS ?= 2
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all install deps run test test-fast lint typecheck bench instructions study memory crash-test fuzz soak clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages for the interop, crash and VM tests (qemu-utils, libnbd-bin, fio, nbdkit, ...).
deps:
	scripts/install-deps

run: install
	$(BIN)/nbdserver serve

lint: install
	$(BIN)/ruff check nbdserver tests scripts

typecheck: install
	$(BIN)/mypy

test: install deps lint typecheck
	$(BIN)/pytest -q -n $(TEST_JOBS)

test-fast: install
	$(BIN)/pytest -q -n $(TEST_JOBS) -m "not slow and not vm"

bench: install deps
	$(BIN)/python scripts/bench.py

# Instructions per I/O under callgrind: the same count on a busy or an idle machine.
instructions: install deps
	$(BIN)/python scripts/instructions.py

study: install deps
	$(BIN)/python scripts/study.py

# Memory the server holds beyond its page cache, under the loads that used to grow it.
memory: install
	$(BIN)/python scripts/memory.py

crash-test: install deps
	$(BIN)/python scripts/crash-test --iterations 200

fuzz: install
	$(BIN)/python scripts/fuzz.py --minutes 10

# The block-map contract's model state machine, for much longer than in the tests.
soak: install
	$(BIN)/python scripts/soak-model.py --minutes 30

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data build *.egg-info
