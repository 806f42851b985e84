#!/bin/sh
# Debian's chromium + chromium-driver for the analyst console's browser tests (tests/e2e/test_console_browser.py,
# driven by Playwright pointed at /usr/bin/chromium: no browser download).
exec sh "$(dirname "$0")/install-debian.sh" "chromium chromedriver" "chromium chromium-driver" \
    "the console's browser tests"
