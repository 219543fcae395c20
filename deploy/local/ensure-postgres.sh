#!/usr/bin/env bash
# Makes a PostgreSQL server available for development, the demo and the tests,
# without Docker:
#   - DATABASE_URL set: only waits until that server answers.
#   - otherwise: starts this machine's PostgreSQL cluster, or installs
#     PostgreSQL from Debian's packages first when none is installed, and lets
#     local TCP connections in without a password (development machines only).
# Prints the server URL (without a database) on its last line.
set -euo pipefail

say() { printf 'ensure-postgres: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

wait_ready() { # host port
  for _ in $(seq 1 60); do
    if pg_isready -q -h "$1" -p "$2" 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  say "PostgreSQL at $1:$2 did not become ready within 30 s"
  return 1
}

if [ -n "${DATABASE_URL:-}" ]; then
  if command -v pg_isready >/dev/null; then
    pg_isready -q -d "$DATABASE_URL" -t 30 || { say "DATABASE_URL does not answer"; exit 1; }
  fi
  echo "$DATABASE_URL"
  exit 0
fi

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  say "no PostgreSQL cluster on this machine: installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq postgresql postgresql-client >/dev/null
fi

read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ "$status" != "online" ]; then
  say "starting PostgreSQL $version/$cluster on port $port"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start
fi

# A fresh Debian install asks for a password over TCP; the postgres role has
# none. Trust loopback connections, as the project's tests expect.
hba="/etc/postgresql/$version/$cluster/pg_hba.conf"
if as_root test -f "$hba"; then
  if ! as_root grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    say "allowing trusted loopback connections in $hba"
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" reload
  fi
fi

wait_ready 127.0.0.1 "$port"
echo "postgres://postgres@127.0.0.1:$port"
