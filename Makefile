# Single entry point: `make demo` (main job: the LiDAR encoder example) and `make test` (test
# suite); `make bench` runs the benchmarks, `make demo-adapters` / `make train` the other examples.
# Each target creates .venv if missing and installs torch==2.13.0 FIRST (pinned: an unpinned
# torch drags in gigabytes of CUDA packages), then the package with its extras.
#
# Variables: PYTHON (interpreter used to create .venv, default python3),
#            SPCONV (the ONE spconv build extra: cpu (default), cu120, cu121, cu124, cu126).

PYTHON ?= python3
VENV ?= .venv
SPCONV ?= cpu
TORCH_PIN := torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo demo-adapters train test bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(SPCONV)-test: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e '.[$(SPCONV),test]'
	touch $@

$(VENV)/.installed-$(SPCONV)-examples: $(VENV)/.installed-$(SPCONV)-test
	$(PIP) -e '.[$(SPCONV),test,examples]'
	touch $@

venv: $(VENV)/.installed-$(SPCONV)-test

test: $(VENV)/.installed-$(SPCONV)-test
	$(PY) -m pytest -q

# the main job: the LiDAR encoder on the shipped real scan (examples/lidar_encoder.py)
demo: $(VENV)/.installed-$(SPCONV)-examples
	$(PY) examples/lidar_encoder.py

# the adapters alone: voxelise, convert, build the index, look voxels up
demo-adapters: $(VENV)/.installed-$(SPCONV)-examples
	$(PY) examples/demo.py

train: $(VENV)/.installed-$(SPCONV)-examples
	$(PY) examples/train_toy.py

# every benchmark module present, one after the other (under flock when available, so two
# benchmarks never share the CPU); e.g. `make bench BENCHMARKS=index BENCH_ARGS=--quick`
BENCHMARKS ?= index msda neighborhood
BENCH_ARGS ?=
LOCK := $(if $(shell command -v flock),flock /tmp/bench.lock,)

bench: $(VENV)/.installed-$(SPCONV)-test
	@set -e; for m in $(BENCHMARKS); do \
	  if [ -f benchmarks/$$m.py ]; then echo "== benchmarks.$$m"; $(LOCK) $(PY) -m benchmarks.$$m $(BENCH_ARGS); fi; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
