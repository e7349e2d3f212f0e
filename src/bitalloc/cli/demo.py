"""`bitalloc demo`: llama.cpp's Q4_K_M preset against bitalloc's plan at its exact size, on the
embedded model, both files run by llama.cpp on the same windows."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.cli.options import DEMO_PRESET
from bitalloc.cli.settings import notices
from bitalloc.formats.gguf_types import PRESETS


def add_parser(sub) -> argparse.ArgumentParser:
    sd = sub.add_parser("demo", help=f"the main job on the embedded SmolLM2-135M: llama.cpp's {DEMO_PRESET} preset "
                                     "against bitalloc's plan of llama.cpp types at exactly its size, both files "
                                     "run by llama.cpp")
    sd.add_argument("--preset", choices=PRESETS, default=DEMO_PRESET,
                    help=f"the llama.cpp preset to compare with, at its exact size (default {DEMO_PRESET})")
    sd.add_argument("--windows", type=A.positive_int(), default=8, help="evaluation windows (default 8)")
    sd.add_argument("--seq-len", type=A.positive_int(1 << 20, 2), default=256,
                    help="tokens per evaluation window (default 256)")
    sd.add_argument("--out", default="out/demo", help="folder for compare.json, compare.md and the two .gguf files "
                                                     "(default out/demo)")

    return sd


def run(args) -> None:
    """llama.cpp's preset against bitalloc's plan of llama.cpp types at its
    exact size, on the embedded model; both files run by llama.cpp on the same
    windows of evaluation text. The settings are fixed (``cli.DEMO_*``), so
    the command alone reproduces what it prints."""
    import time

    from bitalloc import api
    from bitalloc.cli.options import DEMO_KL_PROBES, DEMO_TYPES
    from bitalloc.compare.gguf import GGUFCompareSettings, compare_gguf, headline, write_report
    from bitalloc.evaluate import EvalSettings
    from bitalloc.evaluate.llamacpp import LlamaCppCrash
    from bitalloc.fileio import check_output_dir
    from bitalloc.scorers import ScorerSettings
    from bitalloc.solve.problem import Budget
    from bitalloc.stages import Stages

    check_output_dir(args.out, "compare.json", "bitalloc.report", flag="--out", overwrite=args.overwrite,
                     own=frozenset({"compare.md", "gguf"}))
    t0 = time.perf_counter()
    settings = GGUFCompareSettings((args.preset,), ("kl",), EvalSettings(args.seq_len, args.windows))
    plan = api.PlanSettings(Budget(1.0, "bytes", "model"), scorer="kl", keep_bits=32,  # the preset's size replaces it
                            menu=api.MenuSettings(format="gguf", types=DEMO_TYPES, embeddings=True),
                            scorer_settings=ScorerSettings(kl_probes=DEMO_KL_PROBES))
    stages = Stages()
    with stages("load the model"):
        loaded = api.load(None, embeddings=True)
    try:
        report = compare_gguf(loaded, settings, plan, f"{args.out}/gguf", progress=not args.quiet,
                              checkpoint=lambda partial: write_report(partial, args.out), stages=stages)
    except LlamaCppCrash as crash:
        raise LlamaCppCrash(f"{crash} The rows measured before it are in {args.out}/compare.md.", path=crash.path,
                            signal_name=crash.signal_name) from None
    notices(report["notices"])
    print(headline(report, time.perf_counter() - t0))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
