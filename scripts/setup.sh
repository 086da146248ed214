#!/usr/bin/env bash
# Create .venv with everything hybridgl/ and backend/ need.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    + test dependencies
#   bash scripts/setup.sh --e2e    + the Label Studio used by the end-to-end tests (.venv-ls)
#                                  and the headless Chromium of the browser test (apt)
#   bash scripts/setup.sh --ray    + Ray (Ray Data, Ray Serve) for --ray in backend.preannotate / hybridgl evaluate
#                                  and backend.serve
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
dev=0; e2e=0; ray=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --e2e) e2e=1 ;;
    --ray) ray=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
# A fresh install is ~7 GB (torch's wheel brings its CUDA libraries): say so before pip runs out
# of disk halfway with an OSError.
if [ ! -x .venv/bin/python ]; then
  need_mb=6800
  [ "$e2e" = 1 ] && need_mb=$((need_mb + 1200))
  [ "$ray" = 1 ] && need_mb=$((need_mb + 600))
  free_mb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1024)}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup needs about $((need_mb / 1000)) GB free in $(pwd) for .venv; $free_mb MB are free" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
reqs=(-r requirements.txt)
[ "$dev" = 1 ] && reqs+=(-r requirements-dev.txt)
[ "$ray" = 1 ] && reqs+=(-r requirements-ray.txt)
.venv/bin/python -m pip install -q "${reqs[@]}"
.venv/bin/python -m pip install -q --no-deps -e .
if [ "$e2e" = 1 ]; then
  bash tests/e2e/setup_ls.sh
  bash tests/e2e/setup_browser.sh
fi
echo "setup done: .venv$([ "$e2e" = 1 ] && echo ' and .venv-ls')"
