#!/usr/bin/env bash
# Fetch the real Prometheus server and promtool (Debian package `prometheus`) into
# .tools/prom/usr/bin, for tests/test_prometheus.py and manual scraping of gateway.
#
# Idempotent: returns at once when both binaries are there. Concurrent callers are
# serialised by a lock file, so two test sessions never extract over each other.
# Order: lock → (already there? done) → apt-get download (apt-get update first only if
# the download fails: the index may be stale or missing) → dpkg-deb -x → print bin dir.
# Needs Debian's apt; `apt-get update` needs root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/prom"
BIN="$DEST/usr/bin"
mkdir -p "$ROOT/.tools"

exec 9>"$ROOT/.tools/prom.lock"
flock 9

if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
    echo "$BIN"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# apt drops privileges to _apt for downloads; let it write into the scratch dir.
chmod 0777 "$WORK"
cd "$WORK"
if ! apt-get download -qq prometheus >/dev/null 2>&1; then
    apt-get update -qq
    apt-get download -qq prometheus
fi
mkdir -p "$DEST"
dpkg-deb -x prometheus_*.deb "$DEST"
test -x "$BIN/prometheus" && test -x "$BIN/promtool"
echo "$BIN"
