# `make test` and `make bench` set everything up themselves.
# - A machine whose python3 already has torch (the lent GPU machine: no network) uses it as is.
# - Otherwise a .venv is created (or reused) with the pinned CPU torch; never an unpinned torch.
SHELL := /bin/bash
TORCH_PIN  := torch==2.13.0
TRITON_PIN := triton==3.8.0
DEPS := numpy pytest pytest-xdist pytest-benchmark ninja setuptools wheel matplotlib transformers==5.17.0

SYS_HAS_TORCH := $(shell python3 -c "import torch" >/dev/null 2>&1 && echo 1)
ifeq ($(SYS_HAS_TORCH),1)
PY := python3
ENV_STAMP := .stamp-env-system
else
PY := $(CURDIR)/.venv/bin/python
ENV_STAMP := .venv/.stamp-env
endif

SOURCES := setup.py $(shell find csrc -type f)
# one test worker per core (pytest-xdist); the GPU session asks for 8 (tools/gpu_session.sh)
PYTEST_ARGS ?= -n auto

.PHONY: test bench env build cuda-check triton-check clean

env: $(ENV_STAMP)

# Makefile: a changed DEPS line reinstalls (pip skips what is there)
.venv/.stamp-env: Makefile
	test -x .venv/bin/python || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing below can pull another one.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TRITON_PIN) $(DEPS) "$(TORCH_PIN)"
	touch $@

.stamp-env-system:
	$(PY) -c "import torch, triton, numpy, pytest; print('using', torch.__version__, 'triton', triton.__version__)"
	touch $@

# The editable install builds the extension in place (pyext/_C*.so); rebuilt when csrc changes.
.stamp-build: $(ENV_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps --no-index -e .
	touch $@

build: .stamp-build

# Every .cu must compile for sm_80 and sm_90a with BuildExtension's defines, GPU or not.
# (the GPU session passes CUDA_CHECK_ARGS="--arch sm_80": its build has just compiled them for sm_90a)
CUDA_CHECK_ARGS ?=
cuda-check: $(ENV_STAMP)
	$(PY) tools/check_cuda.py $(CUDA_CHECK_ARGS)

# Every Triton kernel variant must compile for sm_90 (Triton's compiler and ptxas, no GPU needed): the
# interpreter that runs them in CI never lowers tl.dot or allocates registers and shared memory.
triton-check: build
	env -u TRITON_INTERPRET $(PY) tools/check_triton.py

test: build cuda-check triton-check
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)
	# the benchmark suite once, untimed: the harness and its cases must keep working
	$(PY) -m pytest -q benchmarks --benchmark-disable

# The libraries users would pick instead (benchmark providers), never with their dependencies (they
# would pull another torch). The GPU machine has no network: wheels carried in .whl/ are used there.
ANCHORS := liger-kernel fla-core rotary-embedding-torch einops flashinfer-python apache-tvm-ffi entmax adasplash \
           quack-kernels
# One at a time, so that a missing wheel skips its own providers only. FlashInfer (CUDA-only, about
# 240 MiB installed), its binding layer, adasplash (Triton kernels) and quack-kernels (CuTe DSL: it
# imports only where nvidia-cutlass-dsl, not carried in .whl, is installed too; elsewhere its provider
# says why) only where torch sees a GPU; entmax (pure PyTorch) everywhere.
.stamp-anchors: $(ENV_STAMP)
	@gpu=$$($(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null); \
	 for a in $(ANCHORS); do \
	   case $$a in flashinfer-python|apache-tvm-ffi|adasplash|quack-kernels) [ "$$gpu" = 1 ] || continue;; esac; \
	   if [ -d .whl ]; then $(PY) -m pip install -q --no-deps --no-index --find-links .whl $$a; \
	   else $(PY) -m pip install -q --no-deps --retries 0 --timeout 10 $$a; fi \
	     || echo "bench: $$a not installed; its providers are skipped"; \
	 done
	touch $@

bench: build .stamp-anchors
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build .stamp-* pyext/*.so *.egg-info
