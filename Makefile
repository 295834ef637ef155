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

# The suite runs on SQLite, then on PostgreSQL (each test in a schema of its own) when one answers at
# POSTGRES_URL; REQUIRE_POSTGRES=1 (CI) turns "skipped" into a failure.
POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

test: $(STAMP) proto-check lint
	$(BIN)/python -m pytest -q
	@if $(BIN)/python scripts/postgres_ready.py "$(POSTGRES_URL)"; then \
		echo "== the same suite on PostgreSQL ($(POSTGRES_URL))"; \
		TEST_DATABASE=postgresql TEST_POSTGRES_URL="$(POSTGRES_URL)" $(BIN)/python -m pytest -q -m "not backend_independent"; \
	elif [ -n "$(REQUIRE_POSTGRES)" ]; then \
		echo "FAILED: REQUIRE_POSTGRES is set and PostgreSQL does not answer"; exit 1; \
	else \
		echo "== SKIPPED the PostgreSQL half of the suite: no PostgreSQL answers at $(POSTGRES_URL) (SQLite passed)"; \
	fi

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
