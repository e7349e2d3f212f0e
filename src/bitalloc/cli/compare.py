"""`bitalloc compare`: every scorer x quantizer x budget on one model and text (integer menus),
or llama.cpp's presets against bitalloc plans at their exact sizes (``--format gguf``)."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.cli.checks import _scorers_of, apply_recipe, prepare_planning
from bitalloc.cli.options import MODEL_HELP, eval_args, menu_args, scorer_list
from bitalloc.cli.settings import eval_settings, plan_settings
from bitalloc.errors import BitallocError
from bitalloc.formats.gguf_types import PRESETS
from bitalloc.quantizers import QUANTIZERS
from bitalloc.stages import Stages


def add_parser(sub) -> argparse.ArgumentParser:
    sc = sub.add_parser("compare", help="every scorer x quantizer x budget on one model: table, plot, correlations")
    sc.add_argument("--model", help=MODEL_HELP)
    sc.add_argument("--budgets", type=A.bpw_list,
                    help="bpw budgets over the quantized units (default 2.5,3,3.5,4; with --format gguf the "
                         "presets' sizes are the budgets)")
    sc.add_argument("--scorers", type=lambda t: "all" if t == "all" else scorer_list(t),
                    help="comma list, or 'all' (default all; with --format gguf rtn-mse-rel,kl)")
    sc.add_argument("--presets", type=A.name_list,
                    help="--format gguf: llama.cpp presets to compare with, at their exact sizes (default Q2_K, "
                         "Q3_K_S, Q3_K_M, Q3_K_L, IQ4_XS, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K); the model must "
                         "be a .gguf file")
    menu_args(sc)
    eval_args(sc, windows=4)
    sc.set_defaults(bytes=None, over=None)
    sc.add_argument("--out", default="out/compare", help="folder for compare.json, compare.md, compare.png")
    return sc


def run(args) -> None:
    from bitalloc import api
    from bitalloc.compare.integer import CompareSettings, compare, markdown, write_outputs
    from bitalloc.fileio import check_output_dir

    gguf = args.format == "gguf"
    if gguf and args.budgets:
        raise BitallocError("--budgets would be ignored: with --format gguf each llama.cpp preset's exact size is the "
                            "budget. Choose presets with --presets.")
    if not gguf and args.presets:
        raise BitallocError("--presets would be ignored: llama.cpp presets are compared with --format gguf.")
    if gguf:
        from bitalloc.compare.gguf import GGUFCompareSettings
        from bitalloc.export.gguf_plan import source_gguf
        from bitalloc.model.loading import resolve_source

        GGUFCompareSettings(tuple(args.presets or ()))  # known preset names
        source_gguf(resolve_source(args.model))
    apply_recipe(args)  # before compare's own defaults: a recipe names the scorer and quantizer
    args.budgets = args.budgets or (2.5, 3.0, 3.5, 4.0)
    args.scorers = args.scorers or (args.scorer if args.recipe else ("rtn-mse-rel", "kl") if gguf else "all")
    if args.quantizer is None:
        args.quantizer = tuple(n for n, q in QUANTIZERS.items() if q.gguf or not gguf)
    prepare_planning(args)
    check_output_dir(args.out, "compare.json", "bitalloc.report", flag="--out", overwrite=args.overwrite,
                     own=frozenset({"compare.md", "compare.png", "gguf"}))
    if gguf:

        return _run_gguf(args)
    settings = CompareSettings(tuple(args.budgets), _scorers_of(args), tuple(args.quantizer), eval_settings(args))
    stages = Stages()
    with stages("load the model"):
        loaded = api.load(args.model)
    report = compare(loaded, settings, plan_settings(args, args.budgets[0]), progress=not args.quiet, stages=stages)
    print(markdown(report))
    for path in write_outputs({"format": "bitalloc.report", **report}, args.out):
        print(f"wrote {path}")


def _run_gguf(args) -> None:
    """`bitalloc compare --format gguf` after the command's checks (``run``)."""
    from bitalloc import api
    from bitalloc.compare.gguf import GGUFCompareSettings, compare_gguf, markdown, write_report
    from bitalloc.evaluate.llamacpp import LlamaCppCrash

    settings = GGUFCompareSettings(tuple(args.presets or PRESETS), _scorers_of(args), eval_settings(args))
    plan = plan_settings(args, 1.0)  # each preset's size replaces this budget
    stages = Stages()
    with stages("load the model"):
        loaded = api.load(args.model, embeddings=True)
    try:
        report = compare_gguf(loaded, settings, plan, f"{args.out}/gguf", text_path=args.text,
                              encoding=args.encoding, progress=not args.quiet,
                              checkpoint=lambda partial: write_report(partial, args.out), stages=stages)
    except LlamaCppCrash as crash:
        raise LlamaCppCrash(f"{crash} The rows measured before it are in {args.out}/compare.md and compare.json.",
                            path=crash.path, signal_name=crash.signal_name) from None
    print(markdown(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
