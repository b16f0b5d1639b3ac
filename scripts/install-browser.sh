#!/usr/bin/env bash
# Installs Chromium (Debian's package `chromium`, /usr/bin/chromium) for the browser-level tests
# in tests/browser, unless it is already there. Playwright drives this Chromium and never
# downloads a browser of its own (`playwright install` cannot reach its download host here).
set -euo pipefail

CHROMIUM="${LAMBDA_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
echo "==> installing Chromium (Debian package chromium)" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
if [ ! -x "$CHROMIUM" ]; then
  echo "install-browser.sh: $CHROMIUM is still missing after installing chromium" >&2
  exit 1
fi
