# pykvm developer targets.
#
#   make            build the C extension in place and the guests
#   make install    pip-install pykvm (editable, with test extras) and build
#   make run        boot the hello64 guest
#   make test       the test suite (pytest)
#   make bench      the benchmarks (quick: make bench BENCH_ARGS=--quick)
#   make fuzz       the hostile guest, 20 seeds of 100,000 accesses (figures in docs/reliability.md)
#   make soak       10,000 VMs, 10 minutes of streaming, 1,000 random stops (docs/reliability.md)
#   make clean      remove build products

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
BENCH_ARGS ?=

.PHONY: all ext guests install run test bench fuzz soak clean

all: ext guests

ext:
	$(PYTHON) -m pykvm._build

guests:
	$(MAKE) -C guests

install:
	$(PIP) install --quiet -e '.[test]'
	$(MAKE) all

run:
	$(PYTHON) -m pykvm run --guest hello64

test: all
	$(PYTHON) -m pytest

bench: all
	$(PYTHON) -m pykvm bench $(BENCH_ARGS)
	$(PYTHON) benchmarks/io_models.py $(BENCH_ARGS)

fuzz: all
	$(PYTHON) -m pykvm.reliability.guest_fuzz --seeds 20 --doc docs/reliability.md

soak: all
	$(PYTHON) -m pykvm.reliability.soak --doc docs/reliability.md

clean:
	$(MAKE) -C guests clean
	rm -rf build dist *.egg-info pykvm/_native*.so pykvm/_native.c .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
