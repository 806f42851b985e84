#!/bin/sh
# Debian's Prometheus (prometheus + promtool) for the observability tests and `make stack`. Idempotent:
# nothing happens when both are on PATH. Grafana is not packaged where this project installs from; its
# dashboards are checked against this Prometheus instead (tests/integration/test_observability.py).
set -eu
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "prometheus is not installed and cannot be from here (needs root and apt-get):" >&2
    echo "  install it (Debian/Ubuntu: sudo apt-get install prometheus); until then the tests that need it skip." >&2
    # CI must run those tests: fail there instead of skipping.
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
echo "installing Debian's prometheus (with promtool)..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
