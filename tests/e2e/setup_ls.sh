#!/usr/bin/env bash
# Create .venv-ls with the Label Studio the end-to-end tests drive (idempotent, ~1-2 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
if [ -x .venv-ls/bin/label-studio ] && .venv-ls/bin/pip show label-studio 2>/dev/null | grep -q "^Version: $VERSION$"; then
  echo "Label Studio $VERSION already in .venv-ls"
  exit 0
fi
[ -x .venv-ls/bin/python ] || "$PY" -m venv .venv-ls
.venv-ls/bin/python -m pip install -q --upgrade pip
.venv-ls/bin/python -m pip install -q "label-studio==$VERSION"
echo "Label Studio $VERSION installed in .venv-ls"
