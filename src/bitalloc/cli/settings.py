"""The parsed command line turned into the library's typed, frozen settings
(``PlanSettings``, ``EvalSettings``), and the small printers every command shares.
No argparse Namespace goes further than this module."""

from __future__ import annotations

import sys
from pathlib import Path

from bitalloc.cli.checks import _scorers_of
from bitalloc.errors import BitallocError


def plan_settings(args, budget_value: float | None):
    from bitalloc.api import MenuSettings, PlanSettings
    from bitalloc.calib.grams import CalibSettings
    from bitalloc.scorers import ScorerSettings
    from bitalloc.solve.problem import Budget, Constraints
    from bitalloc.solve.refine import RefineSettings

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
                                       kl_probes=args.kl_probes, kl_anchors=args.kl_anchors),
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


def recorded_calibration(args, plan) -> None:
    """The calibration a plan records (``provenance.importance``: windows,
    length, text) as this command's, so that quantizing reproduces the plan's
    importance matrix without the flags being typed again."""
    from bitalloc.calib.grams import DEFAULT_CALIB_LABEL

    recorded = plan.provenance.importance
    if recorded is None:
        return
    args.calib_windows = recorded.calib["windows"]
    args.calib_seq_len = recorded.calib["seq_len"]
    if recorded.text != DEFAULT_CALIB_LABEL:
        args.calib_text = recorded.text


def plan_calibration(args, plan) -> bool:
    """Whether quantizing ``plan`` reads calibration text (GPTQ, or RTN with the
    importance matrix); calibration flags given for a plan that reads none are
    refused, and flags not given take the values the plan records."""
    from bitalloc.cli.checks import CALIB_FLAGS, given_flags
    from bitalloc.quantizers import quantizer

    calibrated = quantizer(plan.quantizer).calibrated or plan.uses_importance
    calib = given_flags(args, CALIB_FLAGS)
    if calib and not calibrated:
        raise BitallocError(f"{calib[0]} would be ignored: the plan {args.plan!r} quantizes by RTN without an "
                            "importance matrix (it was made with --no-imatrix), which uses no calibration text.")
    if not calib:
        recorded_calibration(args, plan)
    return calibrated


def eval_settings(args):
    from bitalloc.evaluate import EvalSettings

    return EvalSettings(args.seq_len, args.windows, getattr(args, "bos", "auto"))


def check_plans_dir(args, values, scorers) -> None:
    from bitalloc.fileio import check_output_file

    if getattr(args, "plans_dir", None):
        for scorer in scorers:
            for value in values:
                check_output_file(Path(args.plans_dir) / f"plan-{scorer}-{value:g}.json", "bitalloc.plan",
                                  flag="--plans-dir file", overwrite=args.overwrite)


def load_for_plan(args, plan, calibrated: bool):
    """What quantize and export share once their own flags are checked: the
    model source and the plan's architecture checked before loading, the
    calibration text read, the plan's settings, and the model loaded."""
    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings
    from bitalloc.cli.checks import check_model_source, check_plan_architecture, read_texts

    check_model_source(args.model, {"--calib-seq-len": args.calib_seq_len} if calibrated else {})
    check_plan_architecture(plan, args.plan, args.model)
    read_texts(args)
    settings = api.PlanSettings(plan.budget, calib_text=args.calib_text, text_encoding=args.encoding,
                                calib=CalibSettings(args.calib_windows, args.calib_seq_len))
    loaded = api.load(args.model, stream=getattr(args, "stream", False), progress=not args.quiet)
    notices(loaded.inventory.notices)
    return settings, loaded
