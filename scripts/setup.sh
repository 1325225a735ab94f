#!/usr/bin/env bash
# Installs this checkout of asynccache (editable) with its test and dev extras, unless the
# interpreter already imports this very checkout with them. (System packages and services:
# scripts/services.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
here=$(pwd -P)
installed=$(cd / && "$PYTHON" -c 'import asynccache, pytest, ruff, mypy, pytest_benchmark, os
print(os.path.dirname(os.path.dirname(os.path.realpath(asynccache.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
  echo "setup: installing asynccache from $here with its test and dev extras"
  "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,dev]'
fi
