# One target per job, used by people and CI alike.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
# xds-protos also ships old copies of the OTLP and googleapis protos into opentelemetry/proto and
# google/, overwriting the real packages' files when it installs after them (then the OTLP exporter
# fails to import). Reinstalling the owners of those files, pinned, puts them back.
RESTORE_PROTOS := $(PIP_INSTALL) --force-reinstall --no-deps opentelemetry-proto googleapis-common-protos

.PHONY: demo test test-deps lint proto install install-dev up clean bench bench-predictor bench-features bench-gateway-sketches \
	bench-batching bench-worker-memory bench-gateway bench-materialize bench-int8

# The runtime install: the services and the CLI (the `server` extra), enough for `fresco demo` and `fresco up`.
# `pip install .` alone is the light client (grpcio, protobuf, numpy).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[server]'
	touch $@

# The developer install: tests, linters and code generators on top.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[server,dev]'
	$(RESTORE_PROTOS)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/fresco demo

up: install
	$(BIN)/fresco up

# Real Redis, Java 17 + Maven for a real Cassandra node, libb64: installed when missing (as root, apt-get),
# otherwise one line says what is missing and how to install it.
test-deps: install
	scripts/ensure-test-deps

test: install-dev test-deps
	$(BIN)/pytest

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/buf lint

# Fresco's predictor against MLServer and a do-nothing gRPC floor, loaded by perf_analyzer (ARGS=--quick).
bench-predictor: install
	$(BIN)/python -m bench.predictor $(ARGS)

# Fresco's feature service against Feast 0.67 on the same Redis, 100k entities × 40 features.
bench-features: install
	$(BIN)/python -m bench.features $(ARGS)

bench-gateway-sketches: install
	$(BIN)/python -m bench.gateway_sketches $(ARGS)

# Every benchmark below in turn, then one summary table of their goals against each peer (ARGS=--quick).
bench: install
	$(BIN)/python -m bench $(ARGS)

# Dynamic batching on a model whose batch-1 compute is over 1 ms, against MLServer's adaptive batching.
bench-batching: install
	$(BIN)/python -m bench.batching $(ARGS)

# Resident and proportional memory of --workers 4 against one worker on a ~200 MB model.
bench-worker-memory: install
	$(BIN)/python -m bench.worker_memory $(ARGS)

# The gateway's own CPU per Predict against the predictor's per ModelInfer, end to end at c16.
bench-gateway: install
	$(BIN)/python -m bench.gateway $(ARGS)

# Materialisation rows/s against Feast's on the same files (SQLite, and Redis + Cassandra).
bench-materialize: install
	$(BIN)/python -m bench.materialize $(ARGS)

# INT8 quantisation of a scikit-learn model: size, latency and accuracy against its parent.
bench-int8: install
	$(BIN)/python -m bench.int8 $(ARGS)

proto: install-dev
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
