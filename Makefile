# The documented commands. `make run` and `make test` install everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test test-fast lint format bench dashboard clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## install the project and its tools into .venv

run: $(STAMP) ## run the default pipeline (dvc repro)
	$(BIN)/dvc repro

test: $(STAMP) ## run the whole test suite, slow tests included
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## skip the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## run the benchmarks; results in bench/results.json
	$(BIN)/python -m bench

dashboard: $(STAMP) ## the Prefect dashboard on http://127.0.0.1:4200
	$(BIN)/tlp server

clean:
	rm -rf data/raw data/prepared data/features models metrics plots dvclive .tlp
