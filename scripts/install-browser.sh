#!/usr/bin/env bash
# Installs the browser the sidebar test drives: Debian's chromium (Playwright cannot download its
# own browser builds here) and fonts-liberation (without it pages render with boxes for glyphs).
# Idempotent and non-interactive: CI runs it as root before the tests; a developer without root
# gets a clear message instead of a sudo prompt.
set -euo pipefail

CHROMIUM="${JUPYTER_LLM_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ] && fc-list 2>/dev/null | grep -qi "liberation"; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser.sh: $CHROMIUM is missing; run 'sudo apt-get install chromium fonts-liberation'," \
         "or point JUPYTER_LLM_CHROMIUM at a Chromium binary" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
echo "install-browser.sh: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium) in $(( $(date +%s) - start )) s"
