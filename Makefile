# `make serve` starts the server on the built-in model (`make serve ARGS="--port 8001"` passes flags); `make test` runs the CPU test suite.
# Both create .venv on first use and install everything from this repository's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv serve generate test lint format gpu-test clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on CI machines this is the CPU build that lies on disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $@

venv: $(BIN)/.installed

serve: venv
	$(BIN)/nextserve serve $(ARGS)

generate: venv
	$(BIN)/nextserve generate --prompt "ROMEO:" --max-tokens 32

test: venv
	$(BIN)/ruff check nextserve tests
	$(BIN)/python -m pytest tests

gpu-test: venv
	$(BIN)/python -m pytest -m gpu tests

lint: venv
	$(BIN)/ruff check nextserve tests
	$(BIN)/ruff format --check nextserve tests

format: venv
	$(BIN)/ruff format nextserve tests
	$(BIN)/ruff check --fix nextserve tests

clean:
	rm -rf $(VENV) build *.egg-info
