# Two entry points on a fresh machine with Python 3.11: `make demo` and `make test`.
# `make docs` builds the documentation site into site/; `make docs-check` is the strict build CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --constraint constraints.txt
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo-structured demo demo-fashion demo-lm fashion-data test test-gpu test-matrix gpu-check lint venv docs docs-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PIP) -e ".[test,examples]"
	touch $(STAMP)

venv: $(STAMP)

$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PIP) -e ".[docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(PY) examples/research/demo.py

# Fashion-MNIST: Debian's dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist),
# installed here when it is missing and apt is there to install it; elsewhere the loader says how
# to get the files. Never fails the target: the tests that need the files skip without them.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-data:
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist (apt)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
			|| echo "could not install dataset-fashion-mnist; the Fashion-MNIST tests will skip"; \
	fi

# RigL at 95% with and without Sup-tickets on the real Fashion-MNIST, 3 seeds (docs/reproducing.md).
demo-fashion: $(STAMP) fashion-data
	$(PY) examples/research/demo.py --data fashion --methods dense rigl --sparsities 0.95 --out runs/demo-fashion

# Structured sparsity on MNIST-1D: unstructured, 2:4, 1:4 and constant fan-in RigL at equal
# density (50% and 75% sparsity, uniform per layer), with and without Sup-tickets, 5 seeds
# (60 runs; docs/reproducing.md). The table's setting: the earlier demo's width-32 network and
# Sup-tickets without select= (lr_high 0.05, the paper's phase 1).
demo-structured: $(STAMP)
	$(PY) examples/research/demo.py --methods rigl --structures none 2:4 1:4 fan_in --sparsities 0.5 0.75 \
		--distribution uniform --seeds 0 1 2 3 4 --width 32 --select none --phase1 paper --lr-high 0.05 \
		--out runs/demo-structured

# A character-level GPT on the standard library's own source: dense, RigL and SET at 80% and 90%,
# with and without Sup-tickets, 3 seeds (27 runs, 2 workers; docs/reproducing.md).
demo-lm: $(STAMP)
	$(PY) examples/research/demo_lm.py --out runs/demo-lm

# The whole suite, offline: pyproject's addopts deselect the `network` tests (make test-matrix).
test: $(STAMP) fashion-data
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The device-generic tests on a GPU (tests/conftest.py: --device); the rest run on the CPU as usual.
test-gpu: $(STAMP)
	$(PY) -m pytest -q --device cuda

# The tests that need the network (pytest -m network: uv resolves constraints.txt for every
# declared Python, with the system's certificates), then the suite on every supported Python x
# {floor, pinned} torch, one venv per cell (README: "Supported versions"); PYTHONS, TORCHES,
# TORCH_INDEX and PYTEST_ARGS select the cells. It uses the uv that `make venv` installs.
MATRIX_OUT ?= runs/test_matrix
test-matrix: $(STAMP)
	scripts/test_matrix.sh $(MATRIX_OUT)

# The prepared GPU check (CUDA tests + benchmarks, < 8 min); without a GPU a < 1 min CPU smoke run.
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check: $(STAMP)
	GPU_CHECK_PYTHON=$(PY) benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

# mkdocs-material prints a notice about its end of life (May 2027) on every build; the versions
# are pinned in constraints.txt, so the notice is silenced here.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs: $(DOCS_STAMP)
	$(MKDOCS) build

docs-check: $(DOCS_STAMP)
	$(MKDOCS) build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache

# The prepared GPU study (examples/research/gpu_study.py): RigL at 95% on Fashion-MNIST with a
# ResNet-18, the base against the Sup-tickets variants, 3 paired seeds run concurrently, within
# 8 minutes on one GPU (the protocol is chosen to fit); tables and summary.json in runs/gpu_study/.
.PHONY: gpu-study
gpu-study: $(STAMP) fashion-data
	$(PY) examples/research/gpu_study.py --out runs/gpu_study

# The booster in the wide-sparse regime, small enough to watch (examples/research/wide_study.py
# --demo): SET-MLP 784-1000-1000-1000-10 at 95% on Fashion-MNIST, RigL on the sparse kernels,
# the base run against SupTicketsScheduler.recommended (select= on validation), 4 paired seeds on
# 2 worker processes; about 5 minutes on 2 idle cores. Tables in runs/demo-wide/results.md.
.PHONY: demo-wide
demo-wide: $(STAMP) fashion-data
	$(PY) examples/research/wide_study.py --demo --out runs/demo-wide
