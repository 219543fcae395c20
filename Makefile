# ocsync developer commands. `make help` lists them.
#
# Postgres: DATABASE_URL when set; otherwise this machine's PostgreSQL, started
# (or installed from Debian's packages, then started) by
# deploy/local/ensure-postgres.sh. No Docker.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
ENSURE_PG := deploy/local/ensure-postgres.sh
# The server the tests create their own databases on, and the demo's database.
PG_SERVER = $(shell $(ENSURE_PG) | tail -n 1 | sed -E 's#/[^/@]*$$##; s#(://[^/]*)$$#\1#')
BENCHES := odm oc_fetch sink_postgres sync queue

.PHONY: help run test bench lint fmt pg

help: ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

pg: ## Make sure a PostgreSQL server is up (installs one if the machine has none).
	@$(ENSURE_PG)

run: ## The demo: Postgres, OpenClinica simulator, a demo CP, API + worker, a full sync with progress.
	$(CARGO) build --release --locked --bin ocsync
	deploy/local/demo.sh

test: ## Run every test (starts Postgres first; each test makes its own database).
	@deploy/local/ensure-tools.sh
	@server="$(PG_SERVER)"; \
	export OCSYNC_TEST_DATABASE_URL="$${OCSYNC_TEST_DATABASE_URL:-$$server/postgres}"; \
	$(CARGO) test --locked --benches; \
	$(CARGO) test --locked --lib --bins --tests

bench: ## Benchmarks, each against a baseline measured in the same run (see the README).
	@server="$(PG_SERVER)"; \
	export OCSYNC_TEST_DATABASE_URL="$${OCSYNC_TEST_DATABASE_URL:-$$server/postgres}"; \
	for b in $(BENCHES); do $(CARGO) bench --locked --bench $$b; done

lint: ## rustfmt check and clippy with warnings as errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt --all
