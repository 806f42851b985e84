#!/bin/sh
# Install Debian packages the tests need unless their commands are already on PATH.
#   sh scripts/install-debian.sh "COMMANDS" "PACKAGES" "WHAT NEEDS THEM"
# Idempotent. Without root or apt-get it says how to install them and exits 0 (the tests that need them
# skip), except in CI (CI set), which must run those tests: there it fails instead.
set -eu
commands=$1 packages=$2 why=$3
missing=0
for command in $commands; do
    command -v "$command" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 1 ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$packages not installed and cannot be from here (needs root and apt-get):" >&2
    echo "  install (Debian/Ubuntu: sudo apt-get install $packages); until then $why skip." >&2
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
echo "installing Debian's $packages..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # a list of package names
apt-get install -y -qq --no-install-recommends $packages >/dev/null
for command in $commands; do
    command -v "$command" >/dev/null
done
