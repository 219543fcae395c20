#!/usr/bin/env bash
# Property-based check of the HTTP API against its own OpenAPI document:
# starts a fresh `ocsync api` (its own database, one CP, an operator token
# made with `ocsync token create`), points schemathesis at
# /api/openapi.json, and fails on any 5xx or any response that does not
# match the document (status, content type, body schema). Bounded: a few
# examples per operation and a wall-clock limit.
#
# Needs: a built `ocsync` (OCSYNC_BIN, default target/debug/ocsync), a
# PostgreSQL server (deploy/local/ensure-postgres.sh), and schemathesis on
# PATH or in SCHEMATHESIS (pip install 'schemathesis==4.32.5').
# Knobs: ST_MAX_EXAMPLES (default 25), ST_TIME_LIMIT seconds (default 300).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

bin="${OCSYNC_BIN:-target/debug/ocsync}"
st="${SCHEMATHESIS:-schemathesis}"
# The checks run from a scratch folder: make a relative path absolute.
case "$st" in */*) st="$(cd "$(dirname "$st")" && pwd)/$(basename "$st")" ;; esac
[ -x "$bin" ] || { say "$bin is missing; run cargo build first"; exit 1; }
command -v "$st" >/dev/null || { say "schemathesis not found (pip install 'schemathesis==4.32.5')"; exit 1; }

server="$(deploy/local/ensure-postgres.sh | tail -n 1)"
server="${server%/}"
db="ocsync_schemathesis_$$"
export DATABASE_URL="$server/$db"
export RUST_LOG="${RUST_LOG:-warn}"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export API_LISTEN="127.0.0.1:$port"
work="$(mktemp -d)"
api_pid=""

cleanup() {
  [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null || true
  psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" migrate --create-database >/dev/null
cat >"$work/cp.toml" <<'TOML'
id = "CP-ST"
[source]
kind = "file"
path = "/nonexistent/study.xml"
TOML
"$bin" cp add "$work/cp.toml" >/dev/null
token="$("$bin" token create schemathesis --role operator)"

"$bin" api 2>"$work/api.log" &
api_pid=$!
# Wait (at most 30 s) for readiness; python rather than curl, which CI
# images may lack.
python3 - "http://$API_LISTEN/readyz" <<'PY' || { say "the API did not become ready"; cat "$work/api.log" >&2; exit 1; }
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
PY

say "running against http://$API_LISTEN (database $db)"
status=0
# From the scratch folder: schemathesis keeps a cache (.schemathesis/) in
# its working directory, which does not belong in the repository.
st="$(command -v "$st")"
(cd "$work" && timeout "${ST_TIME_LIMIT:-300}" "$st" run "http://$API_LISTEN/api/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${ST_MAX_EXAMPLES:-25}" \
  --seed 1 \
  --no-color) || status=$?
if grep -qi "panicked" "$work/api.log"; then
  say "the API panicked:"; grep -i -A3 panicked "$work/api.log" >&2; status=1
fi
[ "$status" -eq 124 ] && say "time limit reached"
exit "$status"
