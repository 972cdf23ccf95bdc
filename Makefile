# Two entry points: `make run` (set up, then run the flow on the embedded default)
# and `make test` (set up, then run the test suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha256sum | cut -c1-12)

export USERNAME ?= counting

.PHONY: setup run test clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python flows/counting_flow.py run --max-workers 2

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .metaflow
