# nqgen: `make demo` and `make test` work on a fresh Debian 12 machine as root; they install what they need.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
NQGEN := $(VENV)/bin/nqgen
OUT ?= out
LAB_ARGS ?=

.PHONY: all deps venv demo test lint unit bench repro-kernel repro clean checkpatch fuzz soak

all: test

deps: $(VENV)/.installed
	@scripts/install-deps

# The virtual environment is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@scripts/install-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Generate every strategy for the installed Debian kernel, build the modules, run them in the VM.
demo: deps
	krel=$$(scripts/debian-kernel) && \
	$(NQGEN) --strategy all --kdir /lib/modules/$$krel/build --out $(OUT) && \
	$(MAKE) -C $(OUT) NQGEN="$(abspath $(NQGEN))" && \
	$(NQGEN) lab --out $(OUT) $(LAB_ARGS)
	@echo "comparison: $(OUT)/COMPARISON.md (and comparison.json), chart: $(OUT)/lab.png"

lint: deps
	$(VENV)/bin/ruff check generator tests
	$(VENV)/bin/mypy

unit: deps
	$(PY) -m pytest -q -m 'not vm and not repro' tests

test: deps lint
	$(PY) -m pytest -q -rs tests

# checkpatch.pl --strict (from linux-source-6.1) on a generated tree: make checkpatch OUT=out
checkpatch: deps
	$(PY) -m nqgen.kstyle $(OUT)

# Every input reader under hypothesis: 10 000 cases per reader (make test runs 150 per reader).
FUZZ_EXAMPLES ?= 10000
fuzz: deps
	NQGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

# Load/unload soak of every strategy under churn on the Debian kernel (issue 12): SOAK_CYCLES per strategy.
SOAK_CYCLES ?= 200
soak: deps
	krel=$$(scripts/debian-kernel) && \
	$(NQGEN) --strategy all --kdir /lib/modules/$$krel/build --out $(OUT)-soak && \
	nice -n 10 $(MAKE) -C $(OUT)-soak NQGEN="$(abspath $(NQGEN))" && \
	nice -n 10 $(PY) -m nqgen.lab.soak --out $(OUT)-soak --cycles $(SOAK_CYCLES)

bench: deps
	$(PY) -m pytest -q benchmarks --benchmark-only

repro-kernel: deps
	$(PY) -m nqgen.reprokernel

repro: repro-kernel
	$(PY) -m nqgen.repro --out $(OUT)-repro

clean:
	rm -rf $(OUT) $(OUT)-repro .pytest_cache .mypy_cache .ruff_cache
