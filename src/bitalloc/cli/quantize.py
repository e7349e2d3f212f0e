"""`bitalloc quantize`: apply a plan to the model and save the quantized folder."""

from __future__ import annotations

import argparse

import bitalloc.cli.argtypes as A
from bitalloc.cli.checks import fill_defaults
from bitalloc.cli.options import MODEL_HELP, calib_args
from bitalloc.cli.settings import load_for_plan, notices, plan_calibration
from bitalloc.errors import BitallocError
from bitalloc.quantizers import quantizer


def add_parser(sub) -> argparse.ArgumentParser:
    sq = sub.add_parser("quantize", help="quantize a model per a plan and save it (safetensors + plan)")
    sq.add_argument("--model", help=MODEL_HELP)
    sq.add_argument("--plan", required=True, help="plan.json from `bitalloc plan` (it names the quantizer)")
    sq.add_argument("--out", required=True, help="output folder (a new folder, or one bitalloc wrote; replaced "
                                                 "atomically)")
    sq.add_argument("--stream", action="store_true",
                    help="read the weights from disk one tensor at a time (a model larger than memory): plans "
                         "without calibration (RTN, no importance matrix)")
    calib_args(sq)
    sq.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    return sq


def run(args) -> None:
    from bitalloc import api
    from bitalloc.export.native import MANIFEST, SAVED_FORMAT
    from bitalloc.fileio import check_output_dir
    from bitalloc.plan import Plan

    plan = Plan.load(args.plan)
    if args.stream and (plan.uses_importance or quantizer(plan.quantizer).calibrated):
        raise BitallocError(f"--stream quantizes without calibration; the plan {args.plan!r} needs "
                            f"{'an importance matrix' if plan.uses_importance else 'GPTQ calibration'}. Plan with "
                            "--stream, or drop --stream here.")
    calibrated = plan_calibration(args, plan)
    fill_defaults(args)
    check_output_dir(args.out, MANIFEST, SAVED_FORMAT, flag="--out", overwrite=args.overwrite)
    settings, loaded = load_for_plan(args, plan, calibrated)
    info = api.quantize(plan_path=args.plan, out=args.out, progress=not args.quiet, settings=settings, loaded=loaded)
    notices(info["notices"])
    s = info["sizes"]
    print(f"wrote {info['out']}: model.safetensors {info['file_bytes'] / 1e6:.3f} MB on disk; plan realizes "
          f"{s['quantized_bpw']:.4f} bpw over the quantized units, {s['model_bpw']:.4f} over the whole model")
