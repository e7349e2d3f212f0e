#!/usr/bin/env bash
# The block-local table (`kl-block`) against the end-to-end one (`kl`) on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF,
# bench/qwen_gguf.sh): plans of llama.cpp types at the sizes of Q2_K and Q3_K_M, every file run by llama.cpp on the
# same 16 x 512 evaluation tokens. Run after bench/qwen_replan.sh, whose cache holds the importance matrix, the
# sweep and every unit's end-to-end probe: kl is then read back, and kl-block measures only its block probes (its
# anchors' end-to-end probes are kl's, read back too; their cold cost is kl's per-probe cost, from that run).
# --no-guard: the two allocations are compared as solved (the guard could swap either for the uniform plan).
#   bench/qwen_kl_block.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-kl-block
WORK=${WORK:-out/qwen-kl-block}
export BITALLOC_CACHE=${BITALLOC_CACHE:-out/qwen-replan/cache}
mkdir -p "$OUT" "$WORK"
/usr/bin/time -v .venv/bin/bitalloc compare --format gguf --model "$GGUF" --presets Q2_K,Q3_K_M \
  --types Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0,IQ4_XS --scorers kl,kl-block --kl-probes 1 --no-guard \
  --windows 16 --seq-len 512 --out "$WORK" --overwrite > "$OUT/compare.log" 2> "$OUT/compare.time"
cp "$WORK/compare.json" "$WORK/compare.md" "$OUT/"
grep -h 'Elapsed (wall\|Maximum resident' "$OUT/compare.time"
rm -f "$WORK"/gguf/*.gguf
