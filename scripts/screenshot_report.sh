#!/usr/bin/env bash
# A PNG of the HTML report, for the README: headless Chromium (Debian's `chromium` package) renders
# `fusion-advisor report RESULT.json` and takes a screenshot of its top HEIGHT pixels.
#
#   scripts/screenshot_report.sh RESULT.json OUT.png [WIDTH [HEIGHT]]      # default 1280 x 2400
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 RESULT.json OUT.png [WIDTH [HEIGHT]]" >&2
    exit 2
fi
result=$1 out=$2 width=${3:-1280} height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "error: no chromium binary (apt-get install chromium)" >&2
    exit 3
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m fusion_advisor.cli report "$result" --html "$work/report.html" --no-terminal
# The flags keep Chromium off the network and out of the user's profile.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --disable-dev-shm-usage \
    --hide-scrollbars --user-data-dir="$work/profile" --virtual-time-budget=15000 \
    --window-size="$width,$height" --screenshot="$work/shot.png" "file://$work/report.html" >/dev/null 2>&1
mkdir -p "$(dirname "$out")"
mv "$work/shot.png" "$out"
echo "wrote $out"
