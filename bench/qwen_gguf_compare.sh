#!/usr/bin/env bash
# llama.cpp's presets Q2_K, Q3_K_M, Q4_K_M and Q5_K_M against bitalloc's measured `kl` plans of llama.cpp types at
# their exact sizes, on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF, rebuilt and checked by bench/qwen_gguf.sh), every
# file run by llama.cpp on the same 16 x 512 evaluation tokens; then re-planning at another size from the cached
# measurements, timed.
#   bench/qwen_gguf_compare.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
# The GGUF files (0.7-1.1 GB each) are deleted at the end; compare.json keeps every row's window sums.
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-gguf-compare
WORK=${WORK:-out/qwen-gguf-compare}
TYPES=Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0,IQ4_XS
export BITALLOC_CACHE=${BITALLOC_CACHE:-$WORK/cache}  # a fresh cache: the table is measured, not read back
mkdir -p "$OUT" "$WORK"
/usr/bin/time -v .venv/bin/bitalloc compare --format gguf --model "$GGUF" --presets Q2_K,Q3_K_M,Q4_K_M,Q5_K_M \
  --types "$TYPES" --scorers kl --kl-probes 1 --windows 16 --seq-len 512 --out "$WORK" --overwrite \
  > "$OUT/compare.log" 2> "$OUT/compare.time"
# Re-planning at a size no preset has (3.75 bpw over the planned tensors), every measurement read from the cache
/usr/bin/time -v .venv/bin/bitalloc --quiet plan --model "$GGUF" --format gguf --types "$TYPES" --scorer kl \
  --kl-probes 1 --bpw 3.75 --out "$WORK/replan-3.75.json" > "$OUT/replan.log" 2> "$OUT/replan.time"
cp "$WORK/compare.json" "$WORK/compare.md" "$WORK/replan-3.75.json" "$OUT/"
grep -h 'Elapsed (wall\|Maximum resident' "$OUT/compare.time" "$OUT/replan.time"
rm -f "$WORK"/gguf/*.gguf
