# Two set-up commands (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS := dev,stack,plot,deploy-lint

.PHONY: demo test lint browser bench clean

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

# The dashboard test drives a real headless Chromium (tests/integration/test_dashboard.py, selenium from the dev
# extra). Installs Debian's chromium + chromium-driver when missing and apt-get is usable (root, or passwordless
# sudo); otherwise, or if the install fails, prints a note and goes on: that test then skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true >/dev/null 2>&1; then sudo="sudo -n"; else sudo=none; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || [ "$$sudo" = none ]; then \
		echo "note: chromium/chromedriver missing and apt-get not usable (needs root or passwordless sudo):" \
			"the dashboard browser test will skip"; exit 0; fi; \
	echo "installing chromium chromium-driver for the dashboard browser test (apt-get)"; \
	{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
		>/dev/null || echo "note: apt-get install chromium chromium-driver failed: the dashboard browser test will skip"

test: $(VENV)/.test-extras lint browser
	$(BIN)/python -m pytest $(ARGS)

bench: $(BIN)/zerocf
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
