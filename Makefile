# Two entry points: `make test` (set up + tests) and `make demo` (the main job, once the
# trainer lands). Everything installs into .venv; torch comes first as the local CPU wheel
# (on a GPU machine set TORCH_SPEC to the build you want, e.g. TORCH_SPEC=torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench gpu-check clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m oreo_fast.cli demo --out runs/demo

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

# on a CUDA machine: install the CUDA torch (TORCH_SPEC), liger-kernel and flash-attn (wheel
# only), run the gpu tests, one FSDP2 nccl step, the pipeline and the benchmarks on CUDA, in
# at most 9 minutes; writes runs/gpu_check/gpu_check.json. Without CUDA: a dry run, exit 0.
gpu-check: setup
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
