"""`bitalloc plan`: score units and solve for a budget; write the plan file."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.cli.checks import INT_MENU_FLAGS, _given, given_flags, prepare_planning
from bitalloc.cli.options import MODEL_HELP, budget_args, menu_args
from bitalloc.cli.settings import notices, plan_settings, write_report
from bitalloc.errors import BitallocError
from bitalloc.plan import GuardVerdict
from bitalloc.quantizers import any_calibrated
from bitalloc.scorers import stronger_than


def add_parser(sub) -> argparse.ArgumentParser:
    sp = sub.add_parser("plan", help="score units and solve for a budget; write plan.json")
    sp.add_argument("--model", help=MODEL_HELP)
    budget_args(sp, many=False)
    menu_args(sp)
    sp.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    sp.add_argument("--table", help="reuse a saved error table instead of scoring again (its menu is the menu)")
    sp.add_argument("--save-table", help="save the error table for reuse with other budgets")
    sp.add_argument("--refine-from", metavar="PLAN", help="continue refining this plan file's allocation (one whose "
                                                          "calibration objective was still falling) instead of the "
                                                          "table's plan: its recorded rounds are kept, new ones "
                                                          "appended; same model, menu and budget")
    sp.add_argument("--stream", action="store_true",
                    help="read the weights from disk one tensor at a time instead of loading the model (a model "
                         "larger than memory; safetensors shards or a GGUF file): data-free scorers, RTN, no "
                         "importance matrix, no guard")
    sp.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="with --stream: run the weight-error sweep as Ray tasks, on a local cluster (no ADDRESS) or "
                         "the one at ADDRESS ('auto', host:port; every node must see the model at the same path); "
                         "needs pip install 'bitalloc[ray]'")
    sp.add_argument("--ray-workers", type=A.positive_int(1024), help="Ray workers (default 2)")
    sp.add_argument("--ray-threads", type=A.positive_int(256),
                    help="torch threads (and Ray CPUs) per worker (default 1)")
    sp.add_argument("--out", help="where to write the plan (JSON)")
    sp.add_argument("--dry-run", action="store_true", help="print sizes and the feasible range; write nothing")
    sp.add_argument("--json", help="also write the summary as JSON here")
    return sp


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


def run(args) -> None:
    from bitalloc import api
    from bitalloc.fileio import check_output_file

    if args.dry_run and (args.out or args.table or args.save_table):
        raise BitallocError("--dry-run writes nothing; --out, --table and --save-table would be ignored. Drop them "
                            "or drop --dry-run.")
    if not args.dry_run and not args.out:
        raise BitallocError("`bitalloc plan` needs --out FILE (or --dry-run to only print sizes).")
    table_file = _reused_table(args)
    prepare_planning(args)
    check_output_file(args.out, "bitalloc.plan", flag="--out", overwrite=args.overwrite)
    check_output_file(args.save_table, "bitalloc.error-table", flag="--save-table", overwrite=args.overwrite)
    settings = plan_settings(args, args.bpw)
    start = _refine_start(args, settings)
    settings = _stream_settings(args, settings)
    loaded = api.load(args.model, embeddings=settings.menu.embeddings, stream=args.stream, progress=not args.quiet)
    notices(loaded.inventory.notices)
    if args.dry_run:
        return _dry_run(loaded, settings, args)
    result = api.plan(settings=settings, table=table_file, save_table=args.save_table, out=args.out,
                      progress=not args.quiet, loaded=loaded, start=start)
    sizes = result.sizes(api.with_plan_units(loaded, result).inventory)
    notices(result.provenance.notices)
    notices(n for n in [guard_notice(result.provenance.guard, settings.scorer)] if n)
    _summary(result, settings, sizes, args.out)
    write_report(args.json, result.to_dict(loaded.inventory))


def _reused_table(args):
    """The error table of --table, checked against the flags it would make ignored; None without --table."""
    if not args.table:
        return None
    from bitalloc.table import ErrorTable

    menu_flags = given_flags(args, INT_MENU_FLAGS)
    if menu_flags:
        raise BitallocError(f"{menu_flags[0]} would be ignored: --table fixes the menu to the options it was "
                            "scored with. Drop it, or score again without --table.")
    imatrix = not args.no_imatrix  # the calibration text still gives the importance matrix
    scoring_flags = [f for f, a, calib in (("--calib-text", "calib_text", True),
                                           ("--calib-windows", "calib_windows", True),
                                           ("--probe-windows", "probe_windows", False),
                                           ("--kl-probes", "kl_probes", False),
                                           ("--kl-anchors", "kl_anchors", False),
                                           ("--alpha-gamma", "alpha_gamma", False))
                     if _given(args, a) and not any_calibrated(args.quantizer) and not (calib and imatrix)]
    if scoring_flags:
        raise BitallocError(f"{scoring_flags[0]} would be ignored: --table reuses measurements made earlier. "
                            "Drop it, or score again without --table.")
    table_file = ErrorTable.load(args.table)
    if not args.scorer:
        args.scorer = (table_file.scorer,)  # the table says how it was scored
    elif args.scorer[0] != table_file.scorer:
        table_file.rescored(args.scorer[0])  # fails now, before the model loads, unless one RTN table serves both
    rising = table_file.rising_units()
    if rising:
        notices([f"The error table {args.table!r} gives {len(rising)} unit(s) (e.g. {rising[0]}) a larger "
                 "distortion at more bits within one format family; it is used as it is. A measured table can do "
                 "this through noise; an edited one should be scored again."])
    return table_file


def _stream_settings(args, settings):
    """--ray and --stream checked before the model is read: Ray installed and given --stream, a local model."""
    from bitalloc import api

    if args.ray is not None:
        from dataclasses import replace

        from bitalloc.scorers.distributed import RaySettings, import_ray

        if not args.stream:
            raise BitallocError("--ray runs the sweep in workers that read the weights from disk themselves: add "
                                "--stream.")
        import_ray()  # installed, before anything is read
        address = None if args.ray == "local" else args.ray
        settings = replace(settings, ray=RaySettings(address, args.ray_workers or 2, args.ray_threads or 1))
    elif _given(args, "ray_workers") or _given(args, "ray_threads"):
        raise BitallocError("--ray-workers/--ray-threads would be ignored without --ray. Add --ray or drop them.")
    if args.stream:  # before the model is read
        from bitalloc.model.loading import resolve_source
        from bitalloc.model.source import check_streamable_source

        settings = api.check_streamable(settings)
        check_streamable_source(resolve_source(args.model))
    return settings


def _summary(result, settings, sizes, out: str) -> None:
    """The plan's options, unit counts and realized size."""
    from bitalloc.compare.report import table

    counts: dict[str, int] = {}
    for opt in result.assignment.values():
        counts[opt.name] = counts.get(opt.name, 0) + 1
    print(table(["option", "units"], sorted(counts.items())))
    print(f"budget: {settings.budget.describe()}; realized {sizes.quantized_bpw:.4f} bpw over the quantized units "
          f"(codes {sizes.code_bpw:.4f} + scales/zeros), {sizes.model_bpw:.4f} bpw over the whole model, "
          f"{sizes.model_bytes / 1e6:.3f} MB; objective ({result.scorer}) {result.objective:.6g}")
    print(f"wrote {out}")


def _dry_run(loaded, settings, args) -> None:
    from bitalloc.api import resolve_menu
    from bitalloc.compare.report import table
    from bitalloc.solve.problem import feasible_range, shown_bound, sizes_of

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


def guard_notice(record: GuardVerdict | None, table: str) -> str | None:
    """What to tell a user whose ``table`` allocation the guard replaced by
    the uniform plan (None when the allocation was kept, or no guard ran):
    both measurements, and where a better allocation may come from."""
    if record is None or not record.replaced:
        return None
    objective = record.objective
    ways = stronger_than(table)
    return (f"the guard measured the {table} allocation worse than the uniform plan of the same size on "
            f"{record.windows} x {record.seq_len} calibration tokens ({objective} "
            f"{record.allocated[objective]:.4f} vs {record.uniform[objective]:.4f}) and returned the uniform "
            "plan. " + (f"A stronger table may beat it: {' or '.join(ways)}. " if ways else "")
            + "--no-guard returns the allocation anyway.")
