#!/usr/bin/env bash
# The streamed path on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF, rebuilt by bench/qwen_gguf.sh): `plan --stream` and
# `quantize --stream` under a memory cap below the model's float32 size, then the same commands loading the model,
# and a byte-for-byte comparison of the table, the plan and the quantized folder.
#   bench/stream_qwen.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf [CAP_MB]
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF}
CAP=${2:-5120}
OUT=bench/stream-qwen
MENU=(--bits 3,4,5 --group-sizes 64,128 --bpw 4.25)
mkdir -p "$OUT"
run() {  # name, cap (MB; 0: none), args...
  local name=$1 cap=$2; shift 2
  local env=(MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=262144 BITALLOC_CACHE="$OUT/cache-${name%%-*}")
  if [ "$cap" = 0 ]; then
    env "${env[@]}" /usr/bin/time -v .venv/bin/bitalloc --quiet "$@" 2> "$OUT/$name.time" > "$OUT/$name.log"
  else
    env "${env[@]}" /usr/bin/time -v .venv/bin/python tests/capped.py "$cap" --quiet "$@" 2> "$OUT/$name.time" \
      > "$OUT/$name.log"
  fi
  echo "$name: $(grep -h 'Elapsed (wall' "$OUT/$name.time" | awk '{print $NF}') wall," \
       "$(grep -h 'Maximum resident' "$OUT/$name.time" | awk '{print $NF/1024}') MB peak RSS;" \
       "$(grep -h '^capped:' "$OUT/$name.time" || true)"
}
rm -rf "$OUT"/cache-* "$OUT"/q-*
run stream-plan "$CAP" plan --model "$GGUF" --stream "${MENU[@]}" --out "$OUT/plan-stream.json" \
  --save-table "$OUT/table-stream.json"
run stream-quantize "$CAP" quantize --model "$GGUF" --stream --plan "$OUT/plan-stream.json" --out "$OUT/q-stream"
run memory-plan 0 plan --model "$GGUF" "${MENU[@]}" --no-guard --no-imatrix --out "$OUT/plan-memory.json" \
  --save-table "$OUT/table-memory.json"
run memory-quantize 0 quantize --model "$GGUF" --plan "$OUT/plan-memory.json" --out "$OUT/q-memory"
for f in table plan; do cmp "$OUT/$f-stream.json" "$OUT/$f-memory.json" && echo "$f: identical"; done
for f in model.safetensors bitalloc.json config.json; do cmp "$OUT/q-stream/$f" "$OUT/q-memory/$f" && echo "q/$f: identical"; done
# kept: each folder's bitalloc.json (the sha256 of every file it wrote) and config.json
find "$OUT"/q-* -type f ! -name bitalloc.json ! -name config.json -delete; rm -rf "$OUT"/cache-*
