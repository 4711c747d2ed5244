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

.PHONY: demo test test-all venv data-packages clean bench harness

venv: $(STAMP)

# torch: keep one that is already there (GPU users install their CUDA build first);
# otherwise the CPU build 2.13.0 (a local wheel on these machines, ~200 MB).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# The evaluation harnesses (tests/test_harness.py; .ci/run installs them): lm-eval from the
# `harness` extra; lmms-eval without its requirements (they pull torchvision, timm and a CUDA
# torch). 0.7.0: 0.7.1-0.7.3 import filelock._api, which filelock 4 no longer has.
# torch must stay the one that was there, and `pip check` clean but for lmms-eval's requirements.
LMMS_EVAL := lmms-eval==0.7
HARNESS_STAMP := $(VENV)/.installed-harness
harness: $(HARNESS_STAMP)
$(HARNESS_STAMP): $(STAMP) pyproject.toml Makefile
	@before=$$($(BIN)/python -c "import torch; print(torch.__version__)"); \
	$(BIN)/pip install -e '.[test,harness]' && $(BIN)/pip install --no-deps '$(LMMS_EVAL)' && \
	after=$$($(BIN)/python -c "import torch; print(torch.__version__)") && \
	if [ "$$before" != "$$after" ]; then echo "harness install replaced torch $$before with $$after"; exit 1; fi
	@# pip check lists lmms-eval's own requirements, left out on purpose; anything else is a conflict
	@other=$$($(BIN)/pip check | grep -v '^lmms-eval [^ ]* requires' || true); \
	if [ -n "$$other" ]; then echo "pip check: $$other"; exit 1; fi; \
	echo "pip check: clean but for lmms-eval's $$($(BIN)/pip check | grep -c '^lmms-eval') requirements left out"
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
	rm -rf $(VENV) runs .pytest_cache
