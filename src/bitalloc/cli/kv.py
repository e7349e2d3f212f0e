"""`bitalloc kv`: bits for the key-value cache. Scores every (layer, K/V,
head) unit, solves a plan per budget, and compares at long context the
float32 cache, uniform codecs, the plans and the per-token policy; with
``--llamacpp`` also picks llama.cpp's ``--cache-type-k/-v`` pair and measures
it in llama.cpp. ``--plan FILE`` evaluates a saved plan instead."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.cli.checks import check_model_source, read_texts
from bitalloc.cli.options import MODEL_HELP
from bitalloc.cli.settings import notices
from bitalloc.errors import BitallocError


def _codecs(text: str) -> tuple[str, ...]:
    from bitalloc.formats.kv import parse_codec

    names = tuple(n.strip().lower() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected a comma list of codec names, e.g. rot3,int8; got {text!r}")
    for n in names:
        try:
            parse_codec(n)
        except BitallocError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def add_parser(sub) -> argparse.ArgumentParser:
    sk = sub.add_parser("kv", help="allocate bits across the KV cache (per layer, K/V and head; per token) and "
                                   "compare with uniform cache types at long context")
    sk.add_argument("--model", help=MODEL_HELP)
    sk.add_argument("--budgets", type=A.bpw_list,
                    help="average stored bits per cached value, scales and norms included (default 3.25,4.25: the "
                         "sizes of rot3 and rot4 at head dimension 64)")
    sk.add_argument("--codecs", type=_codecs, help="the menu a plan chooses from per unit (default "
                                                   "f16,int8,int4,int2,rot4,rot3,rot2)")
    sk.add_argument("--uniform", type=_codecs, default=("int8", "int4", "rot4", "rot3", "rot2"),
                    help="uniform cache codecs evaluated as rows (default int8,int4,rot4,rot3,rot2; f16 always)")
    sk.add_argument("--scorer", choices=("kv-kl", "kv-mse", "kv-var"), default="kv-kl",
                    help="kv-kl: measured end-to-end KL per unit (one probe per unit, from its layer on); kv-mse: "
                         "each codec's relative reconstruction error on the unit's vectors; kv-var: the absolute "
                         "error, keys and values each on their own scale (both proxies need no probes)")
    sk.add_argument("--ladder", type=_codecs, default=("rot2", "rot4", "rot8", "f16"),
                    help="per-token policy: codecs from cheapest to richest (default rot2,rot4,rot8,f16: 2/4/8/16 "
                         "bits, Don't Waste Bits' ladder)")
    sk.add_argument("--sink", type=A.positive_int(1 << 20, 0), default=4,
                    help="per-token policy: leading tokens always stored by the ladder's top codec (default 4)")
    sk.add_argument("--no-token-policy", action="store_true", help="skip the per-token policy rows")
    sk.add_argument("--llamacpp", nargs="?", const="auto", metavar="GGUF",
                    help="also pick llama.cpp's K/V cache types for --llamacpp-budget and measure them in llama.cpp "
                         "on the same windows; GGUF defaults to the model itself when it is a .gguf file")
    sk.add_argument("--llamacpp-budget", type=A.bpw, default=6.5,
                    help="bits per cached value for the llama.cpp pair (default 6.5: between q4_0 and q8_0)")
    sk.add_argument("--context", type=A.positive_int(1 << 24), default=8192,
                    help="context length at which cache sizes are reported (default 8192)")
    sk.add_argument("--plan", help="evaluate this KV plan file (from an earlier `bitalloc kv`) instead of planning")
    g = sk.add_argument_group("text")
    g.add_argument("--text", help="evaluation text file (default: the evaluation half of the offline Wikipedia "
                                  "sample)")
    g.add_argument("--calib-text", help="calibration text file (default: the calibration half of the sample, "
                                        "disjoint from the evaluation half)")
    g.add_argument("--encoding", type=A.encoding, default="utf-8", help="encoding of the text files")
    g.add_argument("--windows", type=A.positive_int(), default=4, help="evaluation windows (default 4)")
    g.add_argument("--seq-len", type=A.positive_int(1 << 20, 2), default=2048,
                   help="tokens per evaluation window: the context the cache holds (default 2048)")
    g.add_argument("--calib-windows", type=A.positive_int(), default=2, help="calibration windows (default 2)")
    g.add_argument("--calib-seq-len", type=A.positive_int(1 << 20, 2), default=512,
                   help="tokens per calibration window (default 512)")
    g.add_argument("--bos", choices=("auto", "yes", "no"), default="auto", help="prepend BOS to each window")
    sk.add_argument("--out", default="out/kv", help="folder for kv.json, kv.md, kv.png and kvplan-<budget>.json")
    return sk


def _llamacpp_gguf(args) -> str | None:
    from pathlib import Path

    from bitalloc.model.loading import resolve_source

    if not args.llamacpp:
        return None
    if args.llamacpp != "auto":
        if not str(args.llamacpp).endswith(".gguf") or not Path(args.llamacpp).is_file():
            raise BitallocError(f"--llamacpp {args.llamacpp!r} is not a .gguf file. Pass the GGUF of the same model.")
        return args.llamacpp
    source = resolve_source(args.model)
    if not source.gguf_file:
        raise BitallocError("--llamacpp without a file needs a .gguf model (the embedded default is one); pass "
                            "--llamacpp PATH.gguf for a model folder.")
    return str(Path(source.path) / source.gguf_file)


def _refuse_ignored(args) -> None:
    if args.plan:
        given = [flag for flag, value in (("--budgets", args.budgets), ("--codecs", args.codecs),
                                          ("--llamacpp", args.llamacpp), ("--calib-text", args.calib_text)) if value]
        if given:
            raise BitallocError(f"{', '.join(given)} would be ignored: --plan evaluates a saved plan. Drop "
                                f"{'it' if len(given) == 1 else 'them'}, or plan anew without --plan.")


def run(args) -> None:

    from bitalloc import api
    from bitalloc.compare.kv import KVCompareSettings, compare_kv, evaluate_plan
    from bitalloc.compare.kv_report import markdown, write_outputs
    from bitalloc.evaluate import EvalSettings
    from bitalloc.evaluate.rows import eval_text
    from bitalloc.fileio import check_output_dir
    from bitalloc.formats.kv import DEFAULT_MENU

    _refuse_ignored(args)
    lengths = {"--seq-len": args.seq_len, **({} if args.plan else {"--calib-seq-len": args.calib_seq_len})}
    check_model_source(args.model, lengths)
    read_texts(args)
    if args.plan:
        from bitalloc.kvcache.plan import KVPlan

        plan = KVPlan.load(args.plan)
    check_output_dir(args.out, "kv.json", "bitalloc.kv-report", flag="--out", overwrite=args.overwrite,
                     own=frozenset({"kv.md", "kv.png"}))
    settings = KVCompareSettings(
        budgets=() if args.plan else tuple(args.budgets or (3.25, 4.25)), menu=args.codecs or DEFAULT_MENU, uniform=args.uniform,
        scorer=args.scorer, eval=EvalSettings(args.seq_len, args.windows, args.bos),
        calib=EvalSettings(args.calib_seq_len, args.calib_windows, args.bos),
        token_policy=not args.no_token_policy and not args.plan, ladder=args.ladder, sink=args.sink,
        llamacpp_gguf=_llamacpp_gguf(args), llamacpp_budget=args.llamacpp_budget, context=args.context)
    loaded = api.load(args.model)
    text = eval_text(args.text, args.encoding)
    if args.plan:
        report = evaluate_plan(loaded, plan, settings, eval_text=text, progress=not args.quiet)
    else:
        report = compare_kv(loaded, settings, calib_text_path=args.calib_text, encoding=args.encoding, eval_text=text,
                            progress=not args.quiet, out_dir=args.out)
    print(markdown(report))
    notices(report.get("notices", ()))
    for path in write_outputs(report, args.out):
        print(f"wrote {path}")
