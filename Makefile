# moe-ops: the entry points are `make bench` and `make test` (each sets up what it needs).
#   make bench   venv + build + the quick benchmark matrix on the device present
#   make test    venv + build (extension, emulator, sanitizer builds) + the whole test suite
#   make gpu-check PYTHON=python3 OUT=dir   the offline one-command check of a GPU machine with the
#                interpreter given (no venv, no downloads); a rehearsal on CPU where no GPU is
#   make test-torch211   the same suite on the oldest supported stack (docs/supported-stacks.md)
#   make lint    ruff (pyproject.toml [tool.ruff]) and clang-format (.clang-format) over the tree; CI runs it
# Knobs: PYTHON (interpreter used to create the venv), VENV, REQUIREMENTS (what the venv gets),
# MAX_JOBS, TORCH_CUDA_ARCH_LIST, MOE_OPS_CUDA=auto|0|1, MOE_OPS_BUILD_DIR, BENCH_ARGS, PYTEST_ARGS.
PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements-dev.txt
PY := $(VENV)/bin/python
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

OUT ?= gpu-check-out

.PHONY: setup install build sim-sanitizers test test-py test-torch211 bench gpu-check plots ptxas clean lint

$(VENV)/.deps: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

setup: $(VENV)/.deps

# Editable install: builds moe_ops._C (CPU + CUDA kernels when nvcc is present) and _C_sim.
install: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# In-place rebuild for development (what install runs, without pip).
build: setup
	$(PY) setup.py -q build_ext --inplace

sim-sanitizers: install
	PY=$(PY) bash scripts/sanitizers.sh

# The NVRTC tests fail instead of skipping when the requirements install CuPy (requirements-dev.txt).
NVRTC_REQUIRED := $(if $(shell grep -ls cupy $(REQUIREMENTS)),1,)

test-py: install
	MOE_OPS_NVRTC_REQUIRED=$(NVRTC_REQUIRED) $(PY) -m pytest -q $(PYTEST_ARGS)

test: install
	MOE_OPS_NVRTC_REQUIRED=$(NVRTC_REQUIRED) $(PY) -m pytest -q $(PYTEST_ARGS)
	PY=$(PY) bash scripts/sanitizers.sh
	@if command -v nvcc >/dev/null; then bash scripts/ptxas_report.sh && cat build/ptxas_report.txt; \
	  else echo "nvcc not found: ptxas report skipped"; fi

# Own venv and CMake build folder, so the two stacks' builds never mix (the last install's
# moe_ops/_C*.so is the one in place: rerun `make install` before using the other venv).
test-torch211:
	$(MAKE) test VENV=.venv-torch211 REQUIREMENTS=requirements-torch211.txt MOE_OPS_BUILD_DIR=build-torch211

bench: install
	$(PY) -m bench --preset quick $(BENCH_ARGS)

# Python lint (pyproject.toml [tool.ruff]); ruff is in requirements-dev.txt.
lint: setup
	PY=$(PY) bash scripts/lint.sh

# No venv prerequisite: the check uses $(PYTHON) as it is (scripts/gpu_check.py; README).
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(OUT)

plots: setup
	$(PY) bench/plot.py

ptxas:
	bash scripts/ptxas_report.sh

clean:
	rm -rf build build-asan build-tsan build-torch211 moe_ops/_C*.so *.egg-info
