# Single entry point: `make demo` (main job: the LiDAR encoder example) and `make test` (test
# suite); `make bench` runs the benchmarks, `make demo-adapters` / `make train` the other examples.
# Each target creates .venv if missing and installs torch==2.13.0 FIRST (pinned: an unpinned
# torch drags in gigabytes of CUDA packages), then the package with its extras.
#
# Variables: PYTHON (interpreter used to create .venv, default python3),
#            SPCONV (the ONE spconv build extra: cpu (default), cu120, cu121, cu124, cu126),
#            TRITON_PIN (default triton==3.9.0, see below).
#
# Triton: the triton backend's tests (tests/test_triton_backend.py) run its kernels on CPU tensors
# through Triton's interpreter, so a CPU torch (whose wheel does not depend on triton) gets a pinned
# triton next to it: triton==3.9.0, the version checked with torch 2.13.0 here. A CUDA torch depends
# on its OWN triton version (e.g. torch 2.11+cu130 -> triton 3.6) and that one must not be replaced:
# the recipe installs TRITON_PIN only when the installed torch does not require triton itself. The
# pin is not in pyproject.toml's extras, since an extra cannot tell the two torch builds apart.
# `make test TRITON_PIN=` installs none (the triton tests then skip, saying why).

PYTHON ?= python3
VENV ?= .venv
SPCONV ?= cpu
TORCH_PIN := torch==2.13.0
TRITON_PIN ?= triton==3.9.0
# exit status 0 iff the installed torch does not depend on triton (a CPU build)
TORCH_WITHOUT_TRITON := import importlib.metadata as m, re, sys; \
  names = [re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in (m.requires("torch") or [])]; \
  sys.exit(any(n in ("triton", "pytorch-triton") for n in names))
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo demo-adapters train test bench venv clean gpu-check gpu-bundle

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(SPCONV)-test: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	@if [ -z "$(TRITON_PIN)" ]; then echo "TRITON_PIN is empty: no triton installed"; \
	elif $(PY) -c '$(TORCH_WITHOUT_TRITON)'; then echo "$(PIP) $(TRITON_PIN)"; $(PIP) '$(TRITON_PIN)'; \
	else echo "torch brings its own triton: $(TRITON_PIN) not installed"; fi
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

# the one-call GPU check (benchmarks/gpu_check.sh): on a CUDA machine without internet, with its own
# python3/torch (no .venv), the spconv bundle made beforehand by `make gpu-bundle` (needs the
# package index), the CUDA tests and the README's benchmark cases on the GPU in 8 minutes;
# logs under LOGDIR. Rehearsal without a GPU: make gpu-check GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python
LOGDIR ?= gpu-check-log
GPU_CHECK_DEVICE ?= cuda
gpu-check:
	GPU_CHECK_DEVICE=$(GPU_CHECK_DEVICE) PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh $(LOGDIR)

gpu-bundle:
	PYTHON=$(PYTHON) bash benchmarks/make_gpu_bundle.sh .gpu_bundle

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
