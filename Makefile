# pykvm developer targets.
#
#   make            build the C extension in place and the guests
#   make install    pip-install pykvm (editable, with test extras) and build
#   make run        boot the hello64 guest
#   make test       the test suite (pytest)
#   make bench      the benchmarks (quick: make bench BENCH_ARGS=--quick)
#   make clean      remove build products

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
BENCH_ARGS ?=

.PHONY: all ext guests install run test bench clean

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

clean:
	$(MAKE) -C guests clean
	rm -rf build dist *.egg-info pykvm/_native*.so pykvm/_native.c .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
