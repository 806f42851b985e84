#!/bin/sh
# Debian's Prometheus (prometheus + promtool) for the observability tests and `make stack`. Grafana is not
# packaged where this project installs from; its dashboards are checked against this Prometheus instead
# (tests/integration/test_observability.py).
exec sh "$(dirname "$0")/install-debian.sh" "prometheus promtool" "prometheus" \
    "the tests that need it"
