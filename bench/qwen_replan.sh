#!/usr/bin/env bash
# The measured `kl` table of llama.cpp types on Qwen2.5-Coder-1.5B (Qwen's Q4_K_M GGUF, bench/qwen_gguf.sh), cold,
# with a sampling profile of the whole run; then re-planning at another size from the cached measurements, timed
# with the guard, without it, and from the saved table.
#   bench/qwen_replan.sh /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
# PYSPY: a py-spy binary (pip install py-spy); the profile is skipped without it.
set -euo pipefail
GGUF=${1:?path to the Qwen GGUF (bench/qwen_gguf.sh)}
OUT=bench/qwen-replan
WORK=${WORK:-out/qwen-replan}
TYPES=Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0,IQ4_XS
export BITALLOC_CACHE=$WORK/cache  # a fresh cache: the table is measured, not read back
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
PLAN=(.venv/bin/bitalloc plan --model "$GGUF" --format gguf --types "$TYPES" --scorer kl --kl-probes 1)
timed() { local name=$1; shift; /usr/bin/time -v "$@" > "$OUT/$name.log" 2> "$OUT/$name.time"; }
# 1. cold: importance matrix, sweep, probes, solve, guard (3.0 bpw over the planned tensors)
timed cold "${PLAN[@]}" --bpw 3.0 --out "$WORK/plan-3.0.json" --save-table "$WORK/table.json" &
if [ -n "${PYSPY:-}" ]; then
  sleep 5
  "$PYSPY" record --pid "$(pgrep -n -f 'bitalloc plan')" --rate 5 --format raw -o "$OUT/cold-profile.txt" \
    > /dev/null 2>&1 || true
fi
wait
# 2. re-plan at 3.75 bpw, every measurement read from the cache, the guard on
timed replan-guard "${PLAN[@]}" --bpw 3.75 --out "$WORK/plan-3.75.json"
# 3. the same without the guard
timed replan "${PLAN[@]}" --bpw 3.75 --no-guard --out "$WORK/plan-3.75-noguard.json"
# 4. from the saved table, without the guard
timed replan-table .venv/bin/bitalloc plan --model "$GGUF" --format gguf --table "$WORK/table.json" --bpw 3.75 \
  --no-guard --out "$WORK/plan-3.75-table.json"
cp "$WORK"/plan-*.json "$OUT/"
for f in cold replan-guard replan replan-table; do
  echo "$f: $(grep -h 'Elapsed (wall' "$OUT/$f.time")  $(grep -h 'Maximum resident' "$OUT/$f.time")"
done
