"""`bitalloc eval`: perplexity, KL and top-1 of a quantized folder or GGUF file against its reference."""

from __future__ import annotations

import argparse

from bitalloc.cli.checks import check_model_source, check_report_path, check_same_vocabulary, fill_defaults, read_texts
from bitalloc.cli.options import MODEL_HELP, eval_args
from bitalloc.cli.settings import eval_settings, notices, write_report
from bitalloc.errors import BitallocError


def add_parser(sub) -> argparse.ArgumentParser:
    se = sub.add_parser("eval", help="perplexity (and KL to a reference) of a model or a quantized folder")
    src = se.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP)
    src.add_argument("--quantized", help="a folder written by `bitalloc quantize` (its files are verified)")
    src.add_argument("--gguf", help="a .gguf file, run by llama.cpp itself (llama-cpp-python) on the same windows")
    se.add_argument("--reference", help="the model to compare against, for KL and top-1 (default: none; "
                                        "'default' means the embedded model; with --gguf a .gguf reference runs "
                                        "in llama.cpp too)")
    eval_args(se)
    se.add_argument("--json", help="write the result as JSON here")
    return se


def run(args) -> None:
    from bitalloc import api

    fill_defaults(args)
    check_report_path(args)
    reference = None if args.reference is None else ("" if args.reference == "default" else args.reference)
    if args.quantized:
        from bitalloc.export.native import read_manifest

        read_manifest(args.quantized)  # damaged or incomplete folders fail here, before any loading
    if args.gguf and not str(args.gguf).endswith(".gguf"):
        raise BitallocError(f"--gguf {args.gguf!r} is not a .gguf file. Pass a GGUF model file.")
    check_model_source(args.gguf or args.model, {"--seq-len": args.seq_len}, quantized=args.quantized)
    if reference is not None:
        check_model_source(reference or None, {"--seq-len": args.seq_len})
        from bitalloc.model.loading import ModelSource, resolve_source

        flag = "--gguf" if args.gguf else "--quantized" if args.quantized else "--model"
        ours = ModelSource("dir", args.quantized) if args.quantized else resolve_source(args.gguf or args.model)
        check_same_vocabulary(flag, ours, reference)
    read_texts(args)
    if args.gguf:
        out = api.evaluate_in_llamacpp(args.gguf, reference_model=reference, text_path=args.text,
                                       encoding=args.encoding, settings=eval_settings(args), progress=not args.quiet)
    else:
        out = api.evaluate(args.model, quantized=args.quantized, reference_model=reference, text_path=args.text,
                           encoding=args.encoding, settings=eval_settings(args), progress=not args.quiet)
    notices(out.get("notices", ()))
    r = out["result"]
    extra = "" if r["kl"] is None else f"  KL {r['kl']:.5f} nats/token  top-1 {r['top1']:.4f}"
    print(f"{out['model']}: perplexity {r['ppl']:.4f} over {r['tokens']} tokens{extra}")
    write_report(args.json, out)
