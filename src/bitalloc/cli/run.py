"""`bitalloc run`: plan, quantize and evaluate at one or more budgets in one process."""

from __future__ import annotations

import argparse

from bitalloc.cli.checks import _scorers_of, prepare_planning
from bitalloc.cli.options import MODEL_HELP, budget_args, eval_args, menu_args
from bitalloc.cli.settings import check_plans_dir, eval_settings, plan_settings, write_report


def add_parser(sub) -> argparse.ArgumentParser:
    sr = sub.add_parser("run", help="all stages plus the uniform baseline at the same budget")
    sr.add_argument("--model", help=MODEL_HELP)
    budget_args(sr, many=True)
    menu_args(sr)
    eval_args(sr)
    sr.add_argument("--plans-dir", help="also write each plan here")
    sr.add_argument("--json", help="write the report as JSON here")
    return sr


def run(args, *, budgets=None, scorers=None) -> dict:
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
