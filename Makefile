# cellseg-kfp: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
PREVIEW ?= 4

.PHONY: help setup data convert test lint format bench lock pipeline-run clean

help: ## List the targets, one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	@touch $@

setup: $(STAMP) ## Create .venv and install the project with its test extras (once)

data: setup ## Obtain raw BCCD into data/BCCD (from BCCD_MIRROR if set) and verify it against data.dvc
	$(BIN)/cellseg data

convert: data ## Convert data/BCCD into the instance-segmentation dataset under out/dataset
	$(BIN)/cellseg convert --source data/BCCD --out $(OUT)/dataset --preview $(PREVIEW)

pipeline-run: convert ## Run the whole pipeline locally (kfp.local, CPU, local profile)
	@echo "dataset: $(OUT)/dataset (manifest.json, preview/*.png)"

lint: setup ## Ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## Lint, then run the whole test suite
	$(BIN)/pytest

bench: data ## Print the benchmarks (conversion rate, ...)
	$(BIN)/python -m cellseg.bench

lock: setup ## Re-resolve requirements.lock from pyproject.toml (needs network)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line \
		-o requirements.lock

clean: ## Remove outputs (keeps .venv and data/)
	rm -rf $(OUT) .pytest_cache .ruff_cache
