#!/usr/bin/env bash
# Debian's Chromium and its WebDriver, for the tests that drive JupyterLab in a real
# browser (tests/test_widgets.py). Run as root on Debian 12; idempotent, and quick
# when both are installed. Never downloads a browser build of its own.
set -euo pipefail

[[ ${EUID} -eq 0 ]] || { echo "install-browser: run as root" >&2; exit 1; }
source "$(dirname "$0")/debian-packages.sh"
install_packages install-browser chromium chromium-driver
