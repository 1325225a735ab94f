# asynccache: common tasks. Variables: CACHE_DIR, CONCURRENCY, PYTHON.
PYTHON ?= python3
CACHE_DIR ?= /data/repo-cache
CONCURRENCY ?= 16
DEMO_DIR ?= .demo
REGISTRY ?= 127.0.0.1:5000
RUN = $(PYTHON) -m asynccache --cache_dir $(CACHE_DIR) --concurrency $(CONCURRENCY)

.PHONY: setup install services demo test lint dev dev100 train small bench bench-checkout clean-demo

# Everything a fresh machine needs: system packages, Python packages, dockerd and the registry.
setup: services install

install:
	bash scripts/setup.sh

services:
	bash scripts/services.sh up

demo: setup
	$(PYTHON) -m tests.support.fixtures --registry $(REGISTRY) --dataset-dir $(DEMO_DIR)/dataset --split demo
	$(PYTHON) -m asynccache --dataset $(DEMO_DIR)/dataset --split demo \
		--cache_dir $(DEMO_DIR)/cache --concurrency $(CONCURRENCY)

test: setup
	CI=$${CI:-} $(PYTHON) -m pytest -q

lint:
	ruff check asynccache tests scripts
	ruff format --check asynccache tests scripts
	mypy asynccache

dev:
	$(RUN) --split dev_10pr_v1

dev100:
	$(RUN) --split dev_100pr_v1

train:
	$(RUN) --split train

small:
	$(RUN) --split dev_10pr_v1 --max_entries 3

BENCH_ARGS ?=

# Throughput against the original script and the peers (loopback, tmpfs, transfer; see README).
bench: setup
	$(PYTHON) scripts/bench.py $(BENCH_ARGS)

bench-checkout: setup
	$(PYTHON) scripts/bench_checkout.py --reps 15

clean-demo:
	rm -rf $(DEMO_DIR)
