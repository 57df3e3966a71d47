# Two set-up commands (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS := dev,stack,plot,deploy-lint

.PHONY: demo test lint bench clean

$(BIN)/zerocf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: $(BIN)/zerocf
	$(BIN)/zerocf demo $(ARGS)

# The tests also exercise the optional Spark ALS backend (extra `spark`: pyspark, ~40 s to install; its tests
# skip themselves where Java is missing).
$(VENV)/.test-extras: $(BIN)/zerocf
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),spark]'
	touch $@

# The gate before the tests: ruff (lint + format) on all code, mypy on the two packages (pyproject.toml).
lint: $(BIN)/zerocf
	$(BIN)/ruff check stream workers tests bench
	$(BIN)/ruff format --check stream workers tests bench
	$(BIN)/mypy

test: $(VENV)/.test-extras lint
	$(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/zerocf
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
