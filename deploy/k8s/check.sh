#!/usr/bin/env bash
# Builds every kustomization and validates the output against the
# Kubernetes schemas (PyPI kubernetes-validate, strict: unknown fields fail).
# The CRDs (ServiceMonitor, PrometheusRule, CloudNativePG Cluster) have no
# bundled schema: kubernetes-validate warns and skips them; the
# PrometheusRule's rules are checked with promtool and against
# grafana/alerts.yml instead. Needs `kustomize` or `kubectl` (its built-in
# kustomize), kubernetes-validate and promtool (deploy/local/ensure-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

if command -v kustomize >/dev/null; then build=(kustomize build)
elif command -v kubectl >/dev/null; then build=(kubectl kustomize)
else echo "check: neither kustomize nor kubectl is installed" >&2; exit 1; fi

out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for k in deploy/k8s/base deploy/k8s/overlays/example; do
  name=$(echo "$k" | tr / _)
  "${build[@]}" "$k" >"$out/$name.yaml"
  kubernetes-validate --strict --quiet "$out/$name.yaml"
  echo "check: $k valid"
done

# The PrometheusRule carries the same groups as grafana/alerts.yml.
python3 - "$out" <<'PY'
import sys, yaml
rules = yaml.safe_load(open("grafana/alerts.yml"))
doc = yaml.safe_load(open("deploy/k8s/base/prometheusrule.yaml"))
assert doc["spec"] == rules, "deploy/k8s/base/prometheusrule.yaml differs from grafana/alerts.yml"
yaml.safe_dump(doc["spec"], open(sys.argv[1] + "/rules.yml", "w"))
PY
promtool check rules "$out/rules.yml" >/dev/null
promtool check rules grafana/alerts.yml >/dev/null
echo "check: alert rules valid and in step"
