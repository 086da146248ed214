#!/usr/bin/env bash
# Install the headless browser of the UI test: Debian's chromium and chromium-driver (idempotent,
# ~30 s the first time). Selenium itself comes from requirements-dev.txt. No browser is downloaded.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium and chromedriver already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install chromium chromium-driver" >&2; exit 1; }
  SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
echo "chromium and chromedriver installed"
