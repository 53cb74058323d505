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

# The lowest transformers setup.py accepts, with the hub and tokenizers releases it needs,
# laid over .venv by PYTHONPATH (a few seconds and ~130 MB instead of a second venv); the
# tests that drive transformers' models (loading, caches, attention routing, search, one
# FSDP2 step at real widths) run against it too.
LOWEST := $(VENV)/lowest-transformers
LOWEST_TRANSFORMERS := 4.56.2
LOWEST_SPEC := transformers==$(LOWEST_TRANSFORMERS) "huggingface_hub>=0.34,<1.0" \
	"tokenizers>=0.22,<0.23" requests urllib3 charset_normalizer certifi
LOWEST_TESTS := tests/test_packaging.py tests/test_models.py tests/test_real_widths.py \
	tests/search tests/train/test_real_width_training.py

$(LOWEST)/.installed: $(VENV)/.installed Makefile
	rm -rf $(LOWEST)
	$(PY) -m pip install -q --no-deps --target $(LOWEST) $(LOWEST_SPEC)
	touch $@

test: setup $(LOWEST)/.installed
	$(PY) -m pytest -q tests
	PYTHONPATH=$(LOWEST) OREO_EXPECT_TRANSFORMERS=$(LOWEST_TRANSFORMERS) \
		$(PY) -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

demo: setup
	$(PY) -m oreo_fast.cli demo --out runs/demo

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

# on a CUDA machine: install the CUDA torch (TORCH_SPEC), liger-kernel and flash-attn (wheel
# only), run the gpu tests, one FSDP2 nccl step, the pipeline and the benchmarks on CUDA, in
# at most 9 minutes; writes runs/gpu_check/gpu_check.json. Without CUDA: a dry run, exit 0.
# VLLM=1: then vLLM sampling against the HF engine (up to 5 more minutes).
gpu-check: setup
	$(PY) scripts/gpu_check.py $(if $(VLLM),--with-vllm)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
