#!/usr/bin/env bash
# Makes sure the tools the observability tests, the browser test and the
# manifest check need are installed: prometheus + promtool (Debian package
# `prometheus`), headless Chromium and its WebDriver (Debian packages
# `chromium`, `chromium-driver`) and the PyPI `kubernetes-validate`. Idempotent; does nothing (quickly) when they
# are already there. Needs root (apt-get) only when something is missing.
set -euo pipefail

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "ensure-tools: installing prometheus (provides promtool)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system Prometheus on :9090; the tests run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
fi

# The browser test (tests/it/browser.rs) drives /usr/bin/chromium through
# /usr/bin/chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "ensure-tools: installing chromium and chromium-driver (browser test)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
fi

if ! command -v kubernetes-validate >/dev/null; then
  echo "ensure-tools: installing kubernetes-validate (PyPI)" >&2
  python3 -m pip install -q kubernetes-validate >&2
fi
