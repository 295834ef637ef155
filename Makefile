# Every target sets up what it needs: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test proto proto-check lint sim sim-large bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/python -m opd_grpc

test: $(STAMP) proto-check lint
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

lint: $(STAMP)
	cd protos && ../$(BIN)/buf lint
	$(BIN)/ruff check --quiet .

sim: $(STAMP)
	$(BIN)/python -m simulation --seed 7 --boards 3

sim-large: $(STAMP)
	$(BIN)/python -m simulation --seed 7 --large

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
