# Two commands matter: `make demo` (the main job) and `make test` (everything).
# Both bootstrap .venv and build the extension in release mode themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

RUST_SRC := $(shell find crates -name '*.rs' -o -name Cargo.toml) Cargo.toml Cargo.lock pyproject.toml
PY_SRC   := $(shell find python -name '*.py')

.PHONY: all build demo test test-rust test-py lint bench bench-quick clean

all: build

# The virtualenv with what building and the demo need; `make test` adds the
# test tools (.deps), so `make demo` installs no more than the demo uses.
$(VENV)/.demo-deps: requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-demo.txt
	touch $@

$(VENV)/.deps: requirements-dev.txt requirements-demo.txt $(VENV)/.demo-deps
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.demo-deps $(RUST_SRC)
	$(VENV)/bin/maturin develop --release -q
	touch $@

# Byte-compiled as `pip install` would compile a wheel: an editable install
# is not, and with PYTHONDONTWRITEBYTECODE set every process (the caller and
# each template) would compile ironpool's sources again at import.
$(VENV)/.compiled: $(VENV)/.built $(PY_SRC)
	$(PY) -m compileall -q python/ironpool
	touch $@

build: $(VENV)/.built $(VENV)/.compiled

demo: build
	$(PY) -m ironpool demo

lint: $(VENV)/.deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-rust:
	cargo test --workspace

test-py: build $(VENV)/.deps
	$(PY) -m mypy.stubtest ironpool._core
	$(PY) -m pytest -q

test: lint test-rust test-py

$(VENV)/.bench-deps: requirements-bench.txt $(VENV)/.deps
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

bench: build $(VENV)/.bench-deps
	$(PY) benches/run.py

bench-quick: build $(VENV)/.bench-deps
	$(PY) benches/run.py --quick

clean:
	rm -rf $(VENV) target
