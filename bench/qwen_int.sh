#!/usr/bin/env bash
# The integer recipe on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF, bench/qwen_gguf.sh) at 3.25 and 4.25 bpw against
# the best single format of each size: a one-probe kl table over 12 asymmetric options, RTN with importance-weighted
# scales, evaluated on 8 x 512 tokens. Reuses bench/qwen_replan.sh's cache (its importance matrix) when it is there.
#   bench/qwen_int.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-int
WORK=${WORK:-out/qwen-int}
export BITALLOC_CACHE=${BITALLOC_CACHE:-out/qwen-replan/cache}
mkdir -p "$OUT" "$WORK"
/usr/bin/time -v .venv/bin/bitalloc compare --model "$GGUF" --budgets 3.25,4.25 --scorers kl --kl-probes 1 \
  --quantizer rtn --bits 2,3,4,5,6,8 --group-sizes 64,128 --schemes asym --windows 8 --seq-len 512 \
  --out "$WORK" --overwrite > "$OUT/compare.log" 2> "$OUT/compare.time"
cp "$WORK/compare.json" "$WORK/compare.md" "$OUT/"
grep -h 'Elapsed (wall\|Maximum resident' "$OUT/compare.time"
