# orlik: `make demo` trains, quantizes and benchmarks the tiny model; `make test` runs the tests.
# Both create .venv and build llama.cpp (once, cached in ~/.cache/orlik) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ORLIK := $(VENV)/bin/orlik
LLAMA_CPP_PYTHON := 0.3.36
ORLIK_CACHE ?= $(HOME)/.cache/orlik
LLAMA_ROOT := $(ORLIK_CACHE)/llama.cpp/$(LLAMA_CPP_PYTHON)-$(shell uname -m)
RUNS ?= runs
MODEL ?= tiny
ARCH ?= llama
export ORLIK_CACHE

.PHONY: demo demo-all demo-train test test-all test-gptq lint llamacpp clean-demo help chromium gptq

help:
	@echo "make demo   - set up, train the tiny model, quantize, benchmark, print the table"
	@echo "make test   - set up and run the test suite (not slow, not gpu)"
	@echo "make demo-train - pretrain -> SFT -> DPO-P -> GRPO on the tiny model (transformers/TRL), with a table"
	@echo "make demo-all - the demo plus GPTQ, AWQ, HQQ and MLX variants in the same table (installs GPTQModel)"
	@echo "make llamacpp - build llama.cpp tools + llama-cpp-python once (cached in $(LLAMA_ROOT))"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@echo "installing torch 2.13.0 (CPU) and orlik's dependencies..."
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[train,calib,serve,bench,dev,hqq,mlx,data,mergekit,eval]" "gguf>=0.17" diskcache
	touch $@

# One llama.cpp build serves the converter, the tools and llama-cpp-python (built without its own copy).
$(VENV)/.llamacpp-$(LLAMA_CPP_PYTHON): $(VENV)/.installed scripts/build-llamacpp.sh
	PIP=$(PIP) LLAMA_CPP_PYTHON_VERSION=$(LLAMA_CPP_PYTHON) bash scripts/build-llamacpp.sh
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install --quiet --no-deps --force-reinstall "$(LLAMA_ROOT)/src"
	site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  mkdir -p $$site/llama_cpp/lib && cp -P $(LLAMA_ROOT)/build/bin/lib*.so* $$site/llama_cpp/lib/
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'uses', '$(LLAMA_ROOT)')"
	touch $@

llamacpp: $(VENV)/.llamacpp-$(LLAMA_CPP_PYTHON)

# GPTQ and AWQ run on GPTQModel, kept out of the default install: it pins numpy 2.2.6 (orlik[all]
# resolves to that) and compiles a C++ kernel on its first use, minutes on 2 cores.
$(VENV)/.gptq: $(VENV)/.installed
	@echo "installing GPTQModel 7.6.0 (orlik[gptq])..."
	$(PIP) install --quiet -e ".[gptq]"
	touch $@

gptq: $(VENV)/.gptq

# CI's GPTQ/AWQ tests run in a second venv layered over .venv: it holds only what orlik[gptq] adds
# (GPTQModel, optimum, torchao and the numpy 2.2.6 they pin, which wins over .venv's on sys.path)
# and sees .venv's torch, transformers and the editable orlik through a .pth file. So `make test`
# keeps testing the default install (numpy as it resolves without the extra), and this tests what
# `pip install "orlik[gptq]"` gives, without a second torch.
VENV_GPTQ := .venv-gptq
$(VENV_GPTQ)/.installed: $(VENV)/.installed pyproject.toml
	$(PYTHON) -m venv $(VENV_GPTQ)
	base=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  own=$$($(VENV_GPTQ)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  echo "import site; site.addsitedir('$$base')" > $$own/orlik_base_venv.pth
	@echo "installing GPTQModel 7.6.0 into $(VENV_GPTQ) (over $(VENV))..."
	$(VENV_GPTQ)/bin/pip install --quiet -e ".[gptq]"
	touch $@

# What `make test` skips without GPTQModel: quantize -> reload in a fresh process -> KLD bound for
# GPTQ and AWQ (slow-marked there), their error checks (including GPTQModel's hard stop), and group
# sizes on a 320-wide model for both.
GPTQ_TESTS := tests/test_backend_gptq.py tests/test_backend_awq.py tests/test_group_sizes.py
test-gptq: llamacpp $(VENV_GPTQ)/.installed
	$(VENV_GPTQ)/bin/python -m pytest -q -p no:cacheprovider $(GPTQ_TESTS) \
	  -k "fresh_process_reload or errors or gptqmodel_group"

# Debian's Chromium for the web chat page test (tests/test_serving_web.py skips, saying so, without it).
chromium:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    || echo "could not install chromium with apt-get; the web page test will skip"; \
	else echo "chromium not installed: run 'sudo apt-get install -y chromium' (the web page test skips without it)"; fi

demo: llamacpp
	bash scripts/demo.sh

# Training end to end on transformers/TRL: pretrain -> SFT -> DPO-P -> GRPO and a table of their figures.
demo-train: $(VENV)/.installed
	bash scripts/demo-train.sh

demo-all: llamacpp gptq
	ALL=1 bash scripts/demo.sh

test: llamacpp chromium
	$(VENV)/bin/pytest -q -m "not slow and not gpu"

test-all: llamacpp chromium gptq
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(RUNS)/$(MODEL)
