#!/usr/bin/env bash
# Lint gate (make lint; CI runs it before the tests): ruff over the Python code (pyproject.toml
# [tool.ruff]) and clang-format over every tracked C++/CUDA file (.clang-format). Fails on any
# violation, so a new one never lands; `scripts/lint.sh --fix` applies both tools' fixes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BIN=$(dirname "$PY")
CLANG_FORMAT=${CLANG_FORMAT:-$BIN/clang-format}
[ -x "$CLANG_FORMAT" ] || CLANG_FORMAT=clang-format
mapfile -t cfiles < <(git ls-files '*.h' '*.cpp' '*.cu' '*.cuh')
if [ "${1:-}" = "--fix" ]; then
  "$PY" -m ruff check --fix .
  "$CLANG_FORMAT" -i "${cfiles[@]}"
  exit 0
fi
"$PY" -m ruff check .
"$CLANG_FORMAT" --dry-run -Werror "${cfiles[@]}"
echo "lint: ruff and clang-format clean (${#cfiles[@]} C++/CUDA files)"
