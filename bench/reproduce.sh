#!/bin/bash
# The same small integer and GGUF runs on any checkout, to check that a change
# reproduces what the code computed before it (BENCHMARKS.md, "The restructure").
#   bench/reproduce.sh SRC_DIR OUT_DIR      e.g. bench/reproduce.sh /tmp/old/src /tmp/before
# Each run gets its own empty cache (OUT_DIR/cache) and one torch thread.
set -u
src=$1; out=$2; mkdir -p "$out"
export BITALLOC_CACHE=$out/cache OMP_NUM_THREADS=1 PYTHONPATH=$src
PY=${PY:-.venv/bin/python}
s=$(date +%s)
$PY -m bitalloc --quiet run --bpw 4 --scorer output --quantizer gptq --bits 3,4,5 --group-sizes 64 --schemes sym \
  --calib-windows 4 --calib-seq-len 256 --refine-rounds 1 --refine-windows 2 --refine-seq-len 128 --windows 4 \
  --seq-len 256 --json "$out/run.json" --plans-dir "$out/plans" > "$out/run.log" 2>&1
echo "run rc=$? $(( $(date +%s) - s )) s" >> "$out/times.txt"
s=$(date +%s)
$PY -m bitalloc --quiet compare --format gguf --presets Q4_K_M --scorers rtn-mse-rel \
  --types Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0 --windows 2 --seq-len 128 --calib-windows 4 --calib-seq-len 256 \
  --out "$out/gguf" > "$out/gguf.log" 2>&1
echo "gguf rc=$? $(( $(date +%s) - s )) s" >> "$out/times.txt"
