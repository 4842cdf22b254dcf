# pykvm developer targets.
#
#   make            build the C extension in place and the guests
#   make install    pip-install pykvm (editable, with the test and bench extras) and build; into .venv when no
#                   venv is active and the Python is externally managed (PEP 668: Debian, Ubuntu).
#                   Editable in setuptools' compat mode: a path entry, not an import hook that
#                   every Python start (and so every pykvm run) would load
#   make run        boot the hello64 guest
#   make test       the test suite (pytest)
#   make bench      the benchmarks (quick: make bench BENCH_ARGS=--quick)
#   make linux      Debian's kernel and a busybox initramfs in ${PYKVM_CACHE:-~/.cache/pykvm}/linux (docs/linux.md)
#   make fuzz       the hostile guest, 20 seeds of 100,000 accesses (figures in docs/reliability.md)
#   make soak       10,000 VMs, 10 minutes of streaming, 1,000 random stops (docs/reliability.md)
#   make clean      remove build products

# The Python every target uses: PYTHON if given; else the active venv's; else .venv's once
# `make install` has made it; else python3.  Expanded when a recipe runs (so `make install run`
# runs in the .venv that install just made).
PYTHON_FOUND = $(or $(PYTHON),$(if $(VIRTUAL_ENV),python3,$(shell test -x .venv/bin/python && echo .venv/bin/python)),python3)
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: all ext guests install run test bench linux fuzz soak clean

all: ext guests

ext:
	$(PYTHON_FOUND) -m pykvm._build

guests:
	$(MAKE) -C guests

install:
	@py='$(PYTHON_FOUND)'; \
	if [ -z "$$VIRTUAL_ENV" ] && $$py -c 'import os, sys, sysconfig; \
	        sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then \
	    echo "== $$py is externally managed (PEP 668): installing into .venv (activate: . .venv/bin/activate)"; \
	    $$py -m venv .venv || { echo "make install: $$py -m venv failed: install python3-venv" >&2; exit 1; }; \
	    py=.venv/bin/python; \
	fi; \
	$$py -m pip install --quiet -e '.[test,bench]' --config-settings editable_mode=compat && \
	$(MAKE) --no-print-directory all PYTHON=$$py

run:
	$(PYTHON_FOUND) -m pykvm run --guest hello64

test: all
	$(PYTHON_FOUND) -m pytest $(PYTEST_ARGS)

bench: all
	$(PYTHON_FOUND) -m pykvm bench $(BENCH_ARGS)

linux:
	$(PYTHON_FOUND) -m pykvm.guests.linux_image

fuzz: all
	$(PYTHON_FOUND) -m pykvm.reliability.guest_fuzz --seeds 20 --doc docs/reliability.md

soak: all
	$(PYTHON_FOUND) -m pykvm.reliability.soak --doc docs/reliability.md

clean:
	$(MAKE) -C guests clean
	rm -rf build dist *.egg-info pykvm/_native*.so pykvm/_native.c .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
