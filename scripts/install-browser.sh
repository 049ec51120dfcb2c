#!/usr/bin/env bash
# Debian's Chromium and its WebDriver, for the tests that drive JupyterLab in a real
# browser (tests/test_widgets.py). Run as root on Debian 12; idempotent, and quick
# when both are installed. Never downloads a browser build of its own.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
log() { printf 'install-browser: %s\n' "$*"; }
[[ ${EUID} -eq 0 ]] || { echo "install-browser: run as root" >&2; exit 1; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "Debian packages: ${PACKAGES[*]} present"
fi
