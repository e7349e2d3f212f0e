#!/usr/bin/env bash
# What the block-local table (`kl-block`) costs against the end-to-end one (`kl`) on Qwen2.5-Coder-1.5B, both cold
# and in turn: each plans from a fresh copy of bench/qwen_replan.sh's cache that keeps the weight-error sweep and
# drops every probe, so each command measures its own probes (kl-block: the block probes and its anchors'
# end-to-end probes). Both save their tables; bench/table_spearman.py then says how alike they rank the tensors.
#   bench/qwen_kl_block_cost.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-kl-block
WORK=${WORK:-out/qwen-kl-block}
SOURCE_CACHE=${SOURCE_CACHE:-out/qwen-replan/cache}
TYPES=Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0,IQ4_XS
mkdir -p "$OUT" "$WORK"
for scorer in kl-block kl; do
  cache="$WORK/cache-$scorer"
  rm -rf "$cache" && mkdir -p "$cache"
  cp -r "$SOURCE_CACHE/errors" "$SOURCE_CACHE/imatrix" "$SOURCE_CACHE"/*.txt "$cache/"
  BITALLOC_CACHE="$cache" /usr/bin/time -v .venv/bin/bitalloc plan --model "$GGUF" --format gguf --types "$TYPES" \
    --scorer "$scorer" --kl-probes 1 --bpw 3.0 --no-guard --out "$WORK/plan-$scorer.json" \
    --save-table "$WORK/table-$scorer.json" > "$OUT/cost-$scorer.log" 2> "$OUT/cost-$scorer.time"
  echo "$scorer: $(grep -h 'Elapsed (wall' "$OUT/cost-$scorer.time")  $(grep -h 'Maximum resident' "$OUT/cost-$scorer.time")"
  tr '\r' '\n' < "$OUT/cost-$scorer.time" | grep '100%' | sed 's/|[^|]*|//'
done
cp "$WORK"/table-kl-block.json "$WORK"/table-kl.json "$OUT/"
python3 bench/table_spearman.py "$OUT/table-kl.json" "$OUT/table-kl-block.json" | tee "$OUT/spearman.md"
