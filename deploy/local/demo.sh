#!/usr/bin/env bash
# The demo behind `make run`: the whole story on one machine.
#   1. PostgreSQL up (deploy/local/ensure-postgres.sh), database created and migrated;
#   2. the OpenClinica simulator serving a generated demo study (OC 3.x REST);
#   3. a demo CP registered from a TOML file;
#   4. `ocsync serve` (API + worker + schedule) in the background;
#   5. a full sync, with its progress, then the counts and where to look
#      (with DEMO_KEEP=1 it then stays up, for the web pages, until Ctrl-C).
# Everything it starts is stopped when it ends. Ports: DEMO_API_PORT (18080)
# and DEMO_OC_PORT (18090).
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${OCSYNC_BIN:-target/release/ocsync}
dir=target/demo
api_port=${DEMO_API_PORT:-18080}
oc_port=${DEMO_OC_PORT:-18090}
subjects=${DEMO_SUBJECTS:-500}
mkdir -p "$dir"

server=$(deploy/local/ensure-postgres.sh | tail -n 1)
export DATABASE_URL=${DATABASE_URL:-${server%/}/ocsync}
export OC_SIM_PASSWORD=demo-password
export API_LISTEN=127.0.0.1:$api_port
# Short heartbeats so a stopped demo does not leave runs claimed for long.
export WORKER_HEARTBEAT_SECS=${WORKER_HEARTBEAT_SECS:-5}
export WORKER_MISSED_HEARTBEATS=${WORKER_MISSED_HEARTBEATS:-3}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { # url what
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "demo: $2 did not come up at $1 (see $dir/*.log)" >&2
  exit 1
}

echo "== database: $(echo "$DATABASE_URL" | sed -E 's#://[^@]*@#://#')"
"$bin" migrate --create-database

echo "== OpenClinica simulator on 127.0.0.1:$oc_port (study S_DEMO, $subjects subjects, 2 sites)"
"$bin" oc-sim --listen "127.0.0.1:$oc_port" --study "S_DEMO:subjects=$subjects:sites=2:seed=42" \
  --user ocsync --password-env OC_SIM_PASSWORD >"$dir/oc-sim.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$oc_port/_sim/counters" "the OpenClinica simulator"

cat >"$dir/demo-cp.toml" <<TOML
# The demo collection protocol: OpenSpecimen CP "DEMO" linked to the
# simulated OpenClinica 3.x study S_DEMO.
id = "DEMO"
description = "Demo CP linked to the simulated OpenClinica study S_DEMO"
batch_size = 50
default_site = "Demo biobank"

[source]
kind = "oc3"
base_url = "http://127.0.0.1:$oc_port/OpenClinica"
study_oid = "S_DEMO"
username = "ocsync"
password = { env = "OC_SIM_PASSWORD" }
query = { include_audits = true }

[site_map]
S_DEMO_SITE1 = "Demo hospital north"
S_DEMO_SITE2 = "Demo hospital south"

[event_map]
SE_SCREENING = "Screening"
SE_VISIT = "Sample collection"
SE_FOLLOWUP = "Follow-up"

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
value_maps = { I_SPECI_TYPE = { BLOOD = "Whole Blood", URINE = "Urine", SERUM = "Serum", PLASMA = "Plasma" } }
TOML
echo "== CP DEMO from $dir/demo-cp.toml"
if "$bin" cp show DEMO >/dev/null 2>&1; then
  "$bin" cp edit DEMO "$dir/demo-cp.toml"
else
  "$bin" cp add "$dir/demo-cp.toml"
fi
"$bin" cp validate DEMO || true

echo "== an API token for the demo (role operator)"
token=$("$bin" token create "demo-$(date +%s)" --role operator | grep -o 'ocs_[0-9a-f]*' | head -n 1)
[ -n "$token" ] || { echo "demo: could not create an API token" >&2; exit 1; }

echo "== ocsync serve (API on http://127.0.0.1:$api_port, worker, schedule)"
"$bin" serve >"$dir/serve.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$api_port/readyz" "ocsync serve"

echo "== full sync of DEMO"
set +e
run=$("$bin" sync DEMO --mode all --wait)
status=$?
set -e
echo
"$bin" runs show "$run"
echo
cat <<MSG
== where to look
  Import log (API):   curl -H "Authorization: Bearer $token" http://127.0.0.1:$api_port/api/v1/runs/$run
  Error report (CSV): curl -H "Authorization: Bearer $token" http://127.0.0.1:$api_port/api/v1/runs/$run/errors.csv
  API description:    curl http://127.0.0.1:$api_port/api/openapi.json
  Import logs (SQL):  psql "$DATABASE_URL" -c 'SELECT * FROM ocsync.import_logs'
  The data (SQL):     psql "$DATABASE_URL" -c 'SELECT ppid, site, gender FROM ocsync_data.participants LIMIT 5'
  Logs:               $dir/serve.log, $dir/oc-sim.log
  Web pages:          http://127.0.0.1:$api_port/ui/runs (sign in with the token above;
                      DEMO_KEEP=1 make run keeps the demo up until Ctrl-C)
MSG
if [ -n "${DEMO_KEEP:-}" ]; then
  echo "== the demo stays up: open http://127.0.0.1:$api_port/ui/runs, sign in with $token; Ctrl-C ends it"
  wait
fi
exit $status
