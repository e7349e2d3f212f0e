"""The CLI's commands: check every argument that depends on another or on a
file, before any model is loaded; then run the stage through ``api`` and
print. The only module besides progress bars that prints."""

from __future__ import annotations

import sys
from pathlib import Path

from bitalloc.cli.checks import (
    CALIB_FLAGS, INT_MENU_FLAGS, _given, _scorers_of, apply_recipe, check_model_source, check_plan_architecture,
    check_report_path, check_same_vocabulary, fill_defaults, given_flags, prepare_planning, read_texts,
)
from bitalloc.errors import BitallocError

def plan_settings(args, budget_value: float | None):
    from bitalloc.api import MenuSettings, PlanSettings
    from bitalloc.calib.grams import CalibSettings
    from bitalloc.solve.problem import Budget, Constraints
    from bitalloc.solve.refine import RefineSettings
    from bitalloc.scorers import ScorerSettings

    if args.bytes is not None:
        budget = Budget(args.bytes, "bytes", "model")
    elif budget_value is None:
        raise BitallocError("Give a budget: --bpw (e.g. --bpw 3.5) or --bytes.")
    else:
        budget = Budget(float(budget_value), "bpw", args.over)
    if args.fine_groups and args.group_sizes:
        raise BitallocError("--fine-groups would be ignored: --group-sizes names the group sizes. Drop one of them.")
    gguf = args.format == "gguf"
    menu = MenuSettings(bits=args.bits, group_sizes=args.group_sizes, schemes=args.schemes,
                        allow_ragged=args.allow_ragged_groups, fine=args.fine_groups, format=args.format,
                        types=args.types, embeddings=args.embeddings or gguf, keep_type=args.keep_type,
                        imatrix=not args.no_imatrix)
    constraints = Constraints(tuple(args.allow), args.min_bits, args.max_bits,
                              tuple(t.strip() for t in args.tie.split(",") if t.strip()))
    return PlanSettings(
        budget, _scorers_of(args)[0], args.solver, menu, constraints, args.keep_bits or (32 if gguf else 16),
        quantizer=args.quantizer[0], act_order=args.act_order, sequential=not args.gptq_one_shot,
        calib_text=args.calib_text, text_encoding=args.encoding,
        calib=CalibSettings(args.calib_windows, args.calib_seq_len),
        scorer_settings=ScorerSettings(alpha_gamma=args.alpha_gamma, alpha_fit=args.alpha_fit, alpha_farms=args.farms,
                                       probe_windows=args.probe_windows, probe_seq_len=args.probe_seq_len,
                                       kl_probes=args.kl_probes),
        refine=RefineSettings(args.refine_rounds, args.refine_windows, args.refine_seq_len, args.refine_candidates,
                              args.refine_objective),
        guard=not args.no_guard,
    )


def write_report(path: str | None, data: dict) -> None:
    if path:
        from bitalloc.fileio import write_json

        write_json(path, {"format": "bitalloc.report", **data})
        print(f"wrote {path}")


def notices(items) -> None:
    for n in items:
        print(f"notice: {n}", file=sys.stderr)


def _refine_start(args, settings):
    """The plan file of --refine-from, read before the model loads."""
    if not args.refine_from:
        return None
    from bitalloc.plan import Plan

    if not settings.refine.rounds:
        raise BitallocError("--refine-from continues a refinement: give --refine-rounds N (N >= 1) too.")
    if args.dry_run:
        raise BitallocError("--refine-from would be ignored: --dry-run only prints sizes.")
    return Plan.load(args.refine_from)


def cmd_plan(args) -> None:
    from bitalloc import api
    from bitalloc.fileio import check_output_file
    from bitalloc.solve.refine import guard_notice
    from bitalloc.compare.report import table

    if args.dry_run and (args.out or args.table or args.save_table):
        raise BitallocError("--dry-run writes nothing; --out, --table and --save-table would be ignored. Drop them "
                            "or drop --dry-run.")
    if not args.dry_run and not args.out:
        raise BitallocError("`bitalloc plan` needs --out FILE (or --dry-run to only print sizes).")
    table_file = None
    if args.table:
        from bitalloc.scorers.table import ErrorTable

        menu_flags = given_flags(args, INT_MENU_FLAGS)
        if menu_flags:
            raise BitallocError(f"{menu_flags[0]} would be ignored: --table fixes the menu to the options it was "
                                "scored with. Drop it, or score again without --table.")
        imatrix = not args.no_imatrix  # the calibration text still gives the importance matrix
        scoring_flags = [f for f, a, calib in (("--calib-text", "calib_text", True),
                                               ("--calib-windows", "calib_windows", True),
                                               ("--probe-windows", "probe_windows", False),
                                               ("--kl-probes", "kl_probes", False),
                                               ("--alpha-gamma", "alpha_gamma", False))
                         if _given(args, a) and "gptq" not in (args.quantizer or ()) and not (calib and imatrix)]
        if scoring_flags:
            raise BitallocError(f"{scoring_flags[0]} would be ignored: --table reuses measurements made earlier. "
                                "Drop it, or score again without --table.")
        table_file = ErrorTable.load(args.table)
        rising = table_file.rising_units()
        if rising:
            notices([f"The error table {args.table!r} gives {len(rising)} unit(s) (e.g. {rising[0]}) a larger "
                     "distortion at more bits within one format family; it is used as it is. A measured table can do "
                     "this through noise; an edited one should be scored again."])
    prepare_planning(args)
    check_output_file(args.out, "bitalloc.plan", flag="--out", overwrite=args.overwrite)
    check_output_file(args.save_table, "bitalloc.error-table", flag="--save-table", overwrite=args.overwrite)
    settings = plan_settings(args, args.bpw)
    start = _refine_start(args, settings)
    loaded = api.load(args.model, embeddings=settings.menu.embeddings)
    notices(loaded.inventory.notices)
    if args.dry_run:
        return _dry_run(loaded, settings, args)
    result = api.plan(settings=settings, table=table_file, save_table=args.save_table, out=args.out,
                      progress=not args.quiet, loaded=loaded, start=start)
    sizes = result.sizes(api.with_plan_units(loaded, result).inventory)
    notices(result.provenance.get("notices", ()))
    notices(n for n in [guard_notice(result.provenance.get("guard", {}), settings.scorer)] if n)
    counts: dict[str, int] = {}
    for opt in result.assignment.values():
        counts[opt.name] = counts.get(opt.name, 0) + 1
    print(table(["option", "units"], sorted(counts.items())))
    print(f"budget: {settings.budget.describe()}; realized {sizes.quantized_bpw:.4f} bpw over the quantized units "
          f"(codes {sizes.code_bpw:.4f} + scales/zeros), {sizes.model_bpw:.4f} bpw over the whole model, "
          f"{sizes.model_bytes / 1e6:.3f} MB; objective ({result.scorer}) {result.objective:.6g}")
    print(f"wrote {args.out}")
    write_report(args.json, result.to_dict(loaded.inventory))


def _dry_run(loaded, settings, args) -> None:
    from bitalloc.api import resolve_menu
    from bitalloc.solve.problem import feasible_range, shown_bound, sizes_of
    from bitalloc.compare.report import table

    inv = loaded.inventory
    options, menu_notices = resolve_menu(inv, settings.menu)
    notices(menu_notices)
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
    ok = lo <= settings.budget.value <= hi
    print(f"budget {settings.budget.describe()}: feasible range {shown_bound(lo, 'lo'):.4f} .. "
          f"{shown_bound(hi, 'hi'):.4f} {unit} -> "
          f"{'feasible' if ok else 'INFEASIBLE'} (before --allow/--min-bits/--max-bits/--tie constraints)")
    write_report(args.json, {"options": [dict(zip(["option", "bpw", "model_bpw", "mb"], r)) for r in rows],
                             "feasible": [lo, hi], "budget": settings.budget.to_dict()})


def cmd_quantize(args) -> None:
    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings
    from bitalloc.fileio import check_output_dir
    from bitalloc.plan import Plan
    from bitalloc.quantizers.apply import MANIFEST, SAVED_FORMAT, uses_importance

    plan = Plan.load(args.plan)
    calib = given_flags(args, CALIB_FLAGS)
    calibrated = plan.quantizer == "gptq" or uses_importance(plan)
    if calib and not calibrated:
        raise BitallocError(f"{calib[0]} would be ignored: the plan {args.plan!r} quantizes by RTN without an "
                            "importance matrix (it was made with --no-imatrix), which uses no calibration text.")
    if not calib:
        recorded_calibration(args, plan)
    fill_defaults(args)
    check_output_dir(args.out, MANIFEST, SAVED_FORMAT, flag="--out", overwrite=args.overwrite)
    check_model_source(args.model, {"--calib-seq-len": args.calib_seq_len} if calibrated else {})
    check_plan_architecture(plan, args.plan, args.model)
    read_texts(args)
    settings = api.PlanSettings(plan.budget, calib_text=args.calib_text, text_encoding=args.encoding,
                                calib=CalibSettings(args.calib_windows, args.calib_seq_len))
    loaded = api.load(args.model)
    notices(loaded.inventory.notices)
    info = api.quantize(plan_path=args.plan, out=args.out, progress=not args.quiet, settings=settings, loaded=loaded)
    notices(info["notices"])
    s = info["sizes"]
    print(f"wrote {info['out']}: model.safetensors {info['file_bytes'] / 1e6:.3f} MB on disk; plan realizes "
          f"{s['quantized_bpw']:.4f} bpw over the quantized units, {s['model_bpw']:.4f} over the whole model")


def recorded_calibration(args, plan) -> None:
    """The calibration a plan records (``provenance.importance``: windows,
    length, text) as this command's, so that quantizing reproduces the plan's
    importance matrix without the flags being typed again."""
    from bitalloc.calib.grams import DEFAULT_CALIB_LABEL

    recorded = plan.provenance.get("importance")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("calib"), dict):
        return
    args.calib_windows = recorded["calib"].get("windows")
    args.calib_seq_len = recorded["calib"].get("seq_len")
    if recorded.get("text") not in (None, DEFAULT_CALIB_LABEL):
        args.calib_text = recorded["text"]


def eval_settings(args):
    from bitalloc.evaluate import EvalSettings

    return EvalSettings(args.seq_len, args.windows, getattr(args, "bos", "auto"))


def cmd_eval(args) -> None:
    from bitalloc import api

    fill_defaults(args)
    check_report_path(args)
    reference = None if args.reference is None else ("" if args.reference == "default" else args.reference)
    if args.quantized:
        from bitalloc.quantizers.apply import read_manifest

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


def check_plans_dir(args, values, scorers) -> None:
    from bitalloc.fileio import check_output_file

    if getattr(args, "plans_dir", None):
        for scorer in scorers:
            for value in values:
                check_output_file(Path(args.plans_dir) / f"plan-{scorer}-{value:g}.json", "bitalloc.plan",
                                  flag="--plans-dir file", overwrite=args.overwrite)


def cmd_run(args, *, budgets=None, scorers=None) -> dict:
    from bitalloc import api
    from bitalloc.compare.report import run_report

    values = list(budgets or args.bpw or [None])
    prepare_planning(args)  # first: a --recipe sets the scorer
    scorers = list(scorers or _scorers_of(args))
    check_plans_dir(args, [args.bytes] if args.bytes is not None else values, scorers)
    settings = plan_settings(args, values[0] if args.bytes is None else None)
    if args.bytes is not None:
        values = [args.bytes]
    report = api.run(settings=settings, model=args.model, scorers=scorers, budgets=values, text_path=args.text,
                     encoding=args.encoding, eval_settings=eval_settings(args), progress=not args.quiet,
                     plans_dir=getattr(args, "plans_dir", None))
    print(run_report(report))
    write_report(args.json, report)
    return report


def cmd_compare(args) -> None:
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
        args.quantizer = ("rtn",) if gguf else ("rtn", "gptq")
    prepare_planning(args)
    check_output_dir(args.out, "compare.json", "bitalloc.report", flag="--out", overwrite=args.overwrite,
                     own=frozenset({"compare.md", "compare.png", "gguf"}))
    if gguf:
        from bitalloc.compare.gguf import cmd_compare_gguf

        return cmd_compare_gguf(args)
    settings = CompareSettings(tuple(args.budgets), _scorers_of(args), tuple(args.quantizer), eval_settings(args))
    loaded = api.load(args.model)
    report = compare(loaded, settings, plan_settings(args, args.budgets[0]), progress=not args.quiet)
    print(markdown(report))
    for path in write_outputs({"format": "bitalloc.report", **report}, args.out):
        print(f"wrote {path}")


def cmd_demo(args) -> None:
    """llama.cpp's preset against bitalloc's plan of llama.cpp types at its
    exact size, on the embedded model; both files run by llama.cpp on the same
    windows of evaluation text. The settings are fixed (``cli.DEMO_*``), so
    the command alone reproduces what it prints."""
    import time

    from bitalloc import api
    from bitalloc.cli import DEMO_KL_PROBES, DEMO_TYPES
    from bitalloc.compare.gguf import GGUFCompareSettings, compare_gguf, headline, write_report
    from bitalloc.evaluate import EvalSettings
    from bitalloc.evaluate.llamacpp import LlamaCppCrash
    from bitalloc.fileio import check_output_dir
    from bitalloc.solve.problem import Budget
    from bitalloc.scorers import ScorerSettings

    check_output_dir(args.out, "compare.json", "bitalloc.report", flag="--out", overwrite=args.overwrite,
                     own=frozenset({"compare.md", "gguf"}))
    t0 = time.perf_counter()
    settings = GGUFCompareSettings((args.preset,), ("kl",), EvalSettings(args.seq_len, args.windows))
    plan = api.PlanSettings(Budget(1.0, "bytes", "model"), scorer="kl", keep_bits=32,  # the preset's size replaces it
                            menu=api.MenuSettings(format="gguf", types=DEMO_TYPES, embeddings=True),
                            scorer_settings=ScorerSettings(kl_probes=DEMO_KL_PROBES))
    loaded = api.load(None, embeddings=True)
    try:
        report = compare_gguf(loaded, settings, plan, f"{args.out}/gguf", progress=not args.quiet,
                              checkpoint=lambda partial: write_report(partial, args.out))
    except LlamaCppCrash as crash:
        raise LlamaCppCrash(f"{crash} The rows measured before it are in {args.out}/compare.md.", path=crash.path,
                            signal_name=crash.signal_name) from None
    notices(report["notices"])
    print(headline(report, time.perf_counter() - t0))
    for path in write_report(report, args.out):
        print(f"wrote {path}")


def cmd_export(args) -> None:
    from bitalloc.export.gguf_plan import cmd_export as run_export

    run_export(args)


COMMANDS = {"plan": cmd_plan, "quantize": cmd_quantize, "export": cmd_export, "eval": cmd_eval, "run": cmd_run,
            "compare": cmd_compare, "demo": cmd_demo}
