# Every target installs what it needs first: `make run` and `make test` work on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run run-ha test test-fast bench migrate reconcile clean

install: $(STAMP)

$(STAMP): requirements/base.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

## Start PostgreSQL and Redis (embedded unless DATABASE_URL / REDIS_URL are set), migrate,
## then the API on :8080, workers, beat and Flower on :5555.
run: install
	$(BIN)/python -m scripts.run

## `make run` on three Patroni-managed PostgreSQL nodes over etcd (installed from requirements/ha.txt
## into var/ha/venv on first use; data under var/ha/). See README, "High availability".
run-ha: install
	$(BIN)/python -m scripts.run_ha

## The whole test suite against real PostgreSQL, Redis, gunicorn and Celery workers.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Only the tests that start no processes but PostgreSQL and Redis (no gunicorn, Celery or CLI):
## WALLET_TESTS_NO_PROCESSES makes any test that would start one fail.
test-fast: install
	WALLET_TESTS_NO_PROCESSES=1 $(BIN)/python -m pytest -m "not slow and not processes" tests/common tests/api tests/worker $(PYTEST_ARGS)

## The benchmark (SPEC section 7). wrk is the load generator when it can be had (Debian's
## package, as root); otherwise bench falls back to its Python client, which costs more CPU.
bench: install
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q wrk >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q wrk >/dev/null 2>&1)); } || echo "wrk unavailable: using the Python load generator"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

migrate: install
	$(BIN)/alembic upgrade head

## Check the ledger's invariants on the database of `make run` (var/env) or DATABASE_URL.
reconcile: install
	set -a; [ -z "$$DATABASE_URL" ] && [ -f var/env ] && . var/env; set +a; \
	$(BIN)/flask --app api wallet reconcile

clean:
	rm -rf $(VENV) var .pytest_cache
