#!/usr/bin/env bash
# The integer weight-error sweep on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF, bench/qwen_gguf.sh), cold: 196 tensors x
# 12 asymmetric options (2-8 bits, groups of 64 and 128) with importance-weighted scales, from a cache holding
# nothing, then checked against the sweep bench/qwen_int.sh cached (OLD_SWEEP), which the code before the sliced
# scale search measured: the same file name (same key) and the same numbers, or the script fails.
#   bench/qwen_int_sweep.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-int
WORK=${WORK:-out/qwen-int-sweep}
OLD_SWEEP=${OLD_SWEEP:-out/qwen-replan/cache/errors/mse-f05720919abed668.json}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK/cache"
BITALLOC_CACHE="$WORK/cache" /usr/bin/time -v .venv/bin/bitalloc plan --model "$GGUF" --scorer rtn-mse-rel \
  --bits 2,3,4,5,6,8 --group-sizes 64,128 --schemes asym --bpw 4.25 --no-guard --out "$WORK/plan.json" \
  > "$OUT/sweep.log" 2> "$OUT/sweep.time"
grep -h 'Elapsed (wall\|Maximum resident' "$OUT/sweep.time"
tr '\r' '\n' < "$OUT/sweep.time" | grep '100%' | sed 's/|[^|]*|//'
new="$WORK/cache/errors/$(basename "$OLD_SWEEP")"
[ -f "$new" ] || { echo "no sweep file $new: the sweep's key changed"; ls "$WORK/cache/errors"; exit 1; }
cmp "$OLD_SWEEP" "$new" && echo "the sweep is identical to the one measured before, byte for byte"
