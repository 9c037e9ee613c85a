# nqgen: `make demo` and `make test` work on a fresh Debian 12 machine as root; they install what they need.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
NQGEN := $(VENV)/bin/nqgen
OUT ?= out
LAB_ARGS ?=
BENCH_ARGS ?=

.PHONY: all deps venv demo test lint unit bench repro-kernel repro rhel-kernels repro-rhel node node-repro node-rhel77 rhel77-lab sig-kernel checkpatch fuzz soak clean

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
	NQGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) nice -n 10 $(PY) -m pytest -q --durations=0 tests/test_fuzz.py tests/test_fuzz_inputs.py

# Load/unload soak of every strategy under churn (issue 12): SOAK_CYCLES per strategy, on the Debian kernel
# ($(OUT)-soak) and, when it is built (make repro-kernel), on the KASAN reference kernel ($(OUT)-soak-ref).
# SOAK_KERNELS=debian or =reference runs one; SOAK_ARGS goes to nqgen.lab.soak (e.g. --strategy ftrace).
SOAK_CYCLES ?= 200
SOAK_KERNELS ?= debian reference
SOAK_ARGS ?=
soak: deps
	rc=0; \
	if [[ " $(SOAK_KERNELS) " == *" debian "* ]]; then \
	  krel=$$(scripts/debian-kernel) && \
	  $(NQGEN) --strategy all --kdir /lib/modules/$$krel/build --out $(OUT)-soak && \
	  nice -n 10 $(MAKE) -C $(OUT)-soak NQGEN="$(abspath $(NQGEN))" && \
	  nice -n 10 $(PY) -m nqgen.lab.soak --out $(OUT)-soak --cycles $(SOAK_CYCLES) $(SOAK_ARGS) || rc=$$?; \
	fi; \
	if [[ " $(SOAK_KERNELS) " == *" reference "* ]]; then \
	  if ref=$$($(PY) -m nqgen.reprokernel --check --print); then \
	    eval "$$ref" && \
	    $(NQGEN) --strategy all --kdir $$KDIR --module $$MODULES_DIR/kernel/net/netfilter/nf_conntrack.ko \
	      --out $(OUT)-soak-ref && \
	    nice -n 10 $(MAKE) -C $(OUT)-soak-ref NQGEN="$(abspath $(NQGEN))" && \
	    nice -n 10 $(PY) -m nqgen.lab.soak --out $(OUT)-soak-ref --cycles $(SOAK_CYCLES) --kernel $$IMAGE \
	      --modules-dir $$MODULES_DIR --kdir $$KDIR --timeout 36000 $(SOAK_ARGS) || rc=$$?; \
	  else echo "make soak: the reference kernel is not built (make repro-kernel): its soak was not run"; rc=1; fi; \
	fi; \
	exit $$rc

# Ratios measured side by side with binutils in one run: tables on stdout, JSON in out-bench/bench.json.
bench: deps
	nice -n 10 $(PY) -m nqgen.bench --out $(OUT)-bench $(BENCH_ARGS)

repro-kernel: deps
	$(PY) -m nqgen.reprokernel

# RHEL test kernels from their source trees (directories, tarballs or .src.rpm), one after the other, cached in
# $$NQGEN_CACHE/kernels/ (nqgen kernel list shows them). Unset sources default to /var/cache/nqgen/src/<recipe>.
RHEL77_SRC ?= /var/cache/nqgen/src/rhel77
RHEL81_SRC ?= /var/cache/nqgen/src/rhel81
rhel-kernels: deps
	$(NQGEN) kernel build rhel81 --source $(RHEL81_SRC)
	$(NQGEN) kernel build rhel81-kasan-free --source $(RHEL81_SRC)
	$(NQGEN) kernel build rhel77 --source $(RHEL77_SRC)

repro: repro-kernel
	$(PY) -m nqgen.repro --out $(OUT)-repro

# The same comparison on RHEL 7.7, RHEL 8.1 and RHEL 8.1 with the extension freed at once (builds each kernel
# from its source, RHEL77_SRC / RHEL81_SRC, when not cached: see README, "CentOS 7 and 8 for real"). Every recipe
# runs even when an earlier one fails; the tables go to $(OUT)-repro-<recipe>/REPRO.md and, together, to
# $(OUT)-repro-rhel.md. REPRO_RHEL_ARGS go to every recipe, REPRO_ARGS_<recipe> to one: e.g. "--repeat 1" (3 boots
# per configuration by default), "--strategy ftrace", "-- --timeout 1200" (KASAN kernels get 900 s per boot, others
# the lab's 180 s).
RHEL_RECIPES ?= rhel77 rhel81 rhel81-kasan-free
REPRO_RHEL_ARGS ?=
rhel_src = $(if $(filter rhel77%,$(1)),$(RHEL77_SRC),$(RHEL81_SRC))
define repro_one
	rm -f $(OUT)-repro-$(1)/REPRO.md; \
	nice -n 10 $(PY) -m nqgen.repro --recipe $(1) --source $(call rhel_src,$(1)) --out $(OUT)-repro-$(1) \
		$(REPRO_RHEL_ARGS) $(REPRO_ARGS_$(1)) || { echo "repro-rhel: $(1) failed"; rc=1; }; \
	cat $(OUT)-repro-$(1)/REPRO.md >> $(OUT)-repro-rhel.md 2>/dev/null; \

endef
repro-rhel: deps
	rc=0; : > $(OUT)-repro-rhel.md; \
	$(foreach r,$(RHEL_RECIPES),$(call repro_one,$(r))) \
	echo "repro-rhel: tables in $(OUT)-repro-rhel.md"; exit $$rc

# The node scenario in full (real dnsmasq, iptables NAT + NFQUEUE, conntrack -E, glibc's resolver):
# on the installed Debian kernel, and on the vulnerable reference kernel.
node: deps
	krel=$$(scripts/debian-kernel) && $(PY) -m nqgen.lab.scenarios.node --target debian --release $$krel \
		--out $(OUT)-node

node-repro: repro-kernel
	$(PY) -m nqgen.lab.scenarios.node --target repro --lookups 400 --out $(OUT)-node-repro

# RHEL 7.7 (needs `nqgen kernel build rhel77`): the node scenario in full, and the RHEL 7.7 lab tests
# (advance-confirm under MASQUERADE with today's and the pre-fix code; IPv6 attached late). Minutes under TCG.
node-rhel77: deps
	$(PY) -m nqgen.lab.scenarios.node --target rhel77 --out $(OUT)-node-rhel77

rhel77-lab: deps
	NQGEN_RHEL_LAB=1 $(PY) -m pytest -q -rs tests/test_rhel77_lab.py

# The reference kernel's variant that enforces module signatures and trusts nqgen's test key (tests/test_pkg.py).
sig-kernel: deps
	$(PY) -m nqgen.pkg.sigkernel

clean:
	rm -rf $(OUT) $(OUT)-repro $(OUT)-repro-rhel* $(OUT)-soak $(OUT)-soak-ref $(OUT)-bench $(OUT)-node $(OUT)-node-repro $(OUT)-node-rhel77 .pytest_cache .mypy_cache .ruff_cache
