"""Group a py-spy profile of `bitalloc plan` (collapsed stacks: `py-spy record --format raw`) by stage.

    python3 bench/profile_summary.py bench/qwen-replan/cold-profile.txt [--rate 5]

Prints thread-seconds and shares per stage as a Markdown table. py-spy samples every Python thread, so work
spread over a thread pool counts once per thread.
"""

from __future__ import annotations

import argparse
import collections

# (stage, every substring a stack must contain), first match wins
STAGES = (
    ("llama.cpp's C quantizers (`ggml_quantize_chunk`): the sweep, then the guard and the write", ("quantize_rows",)),
    ("the sweep: error norms in float64 (`stable_sum`)", ("_unit_errors", "stable_sum")),
    ("the sweep: the rest of bitalloc's Python", ("_unit_errors",)),
    ("probes: forwards of the model's tail", ("measure_per_unit", "forward")),
    ("probes: the rest", ("measure_per_unit",)),
    ("importance matrix (calibration forwards)", ("ensure_importance",)),
    ("load (gguf-py dequantizing, reading)", ("load (bitalloc/api.py",)),
)


def summarize(lines, rate: float) -> list[tuple[str, float, float]]:
    counts: collections.Counter = collections.Counter()
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        stage = next((name for name, parts in STAGES if all(p in stack for p in parts)), "everything else")
        counts[stage] += int(n)
    total = sum(counts.values())
    order = [name for name, _ in STAGES] + ["everything else"]
    return [(s, counts[s] / rate, counts[s] / total) for s in order if counts[s]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--rate", type=float, default=5.0, help="samples per second given to py-spy (default 5)")
    args = p.parse_args()
    with open(args.profile) as f:
        rows = summarize(f, args.rate)
    print("| where | thread-s | share |\n|---|---|---|")
    for stage, seconds, share in rows:
        print(f"| {stage} | {seconds:,.0f} | {share:.1%} |")


if __name__ == "__main__":
    main()
