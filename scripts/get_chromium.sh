#!/usr/bin/env bash
# Install Debian's headless browser (chromium + chromium-driver) for tests/test_web_ui.py, so a
# fresh machine running the README's test command runs the browser tests instead of skipping them.
#
# Idempotent: returns at once when both binaries are on PATH. Concurrent callers are serialised
# by a lock file. Order: lock → (already there? done) → apt-get install (apt-get update first
# only if the install fails: the index may be stale or missing) → print the two paths.
# Needs Debian's apt and root; exits 2 with a reason otherwise (the tests then skip, saying it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$ROOT/.tools"
exec 9>"$ROOT/.tools/chromium.lock"
flock 9

found() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
if ! found; then
    command -v apt-get >/dev/null || { echo "no apt-get to install chromium with" >&2; exit 2; }
    [[ "$(id -u)" == 0 ]] || { echo "installing chromium needs root (apt-get install chromium chromium-driver)" >&2; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    fi
    found
fi
command -v chromium
command -v chromedriver
