# Two commands: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-cluster install stack-down clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "quotaflow needs Python 3.11 or newer; set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/quotaflow demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The cluster tests (pytest marker `cluster`, left out of `make test`: three Kafka brokers,
# a Redis Cluster): each runs servers of several nodes, so one at a time (-n 0).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster -n 0

stack-down: $(STAMP)
	$(BIN)/quotaflow stack down

clean:
	-$(BIN)/quotaflow stack down
	rm -rf $(VENV) .quotaflow .quotaflow-test
