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
DEMO_DIR := target/demo

.PHONY: help run test bench lint fmt pg

help: ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

pg: ## Make sure a PostgreSQL server is up (installs one if the machine has none).
	@$(ENSURE_PG)

run: ## The demo: Postgres up, schema migrated, a generated study read end to end.
	@server="$(PG_SERVER)"; \
	export DATABASE_URL="$${DATABASE_URL:-$$server/ocsync}"; \
	$(CARGO) build --release --locked --bin ocsync; \
	bin=target/release/ocsync; mkdir -p $(DEMO_DIR); \
	$$bin migrate --create-database; \
	$$bin odm generate --subjects 200 --sites 2 --seed 42 > $(DEMO_DIR)/study.xml; \
	echo "== generated $(DEMO_DIR)/study.xml ($$(du -h $(DEMO_DIR)/study.xml | cut -f1))"; \
	echo "== ocsync odm stats $(DEMO_DIR)/study.xml"; $$bin odm stats $(DEMO_DIR)/study.xml; \
	echo "== first values (ocsync odm dump $(DEMO_DIR)/study.xml | head -3)"; \
	$$bin odm dump $(DEMO_DIR)/study.xml | head -n 3; \
	echo "== database ready at $$(echo "$$DATABASE_URL" | sed -E 's#://[^@]*@#://#')"

test: ## Run every test (starts Postgres first; each test makes its own database).
	@server="$(PG_SERVER)"; \
	export OCSYNC_TEST_DATABASE_URL="$${OCSYNC_TEST_DATABASE_URL:-$$server/postgres}"; \
	$(CARGO) test --locked --all-targets

bench: ## Benchmarks: ODM reader against a bare XML loop (and peak memory); Postgres sink against a bare COPY.
	$(CARGO) bench --locked --bench odm
	$(CARGO) bench --locked --bench sink_postgres

lint: ## rustfmt check and clippy with warnings as errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt --all
