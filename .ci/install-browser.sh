#!/usr/bin/env bash
# What the browser test (tests/test_dashboard.py, marker `browser`) needs besides Python packages: Debian's headless
# Chromium and its chromedriver. Idempotent: does nothing when both are already on PATH. selenium itself comes with
# the `dev` extra that `make test` installs; Selenium Manager is never used, so nothing is downloaded at test time.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
