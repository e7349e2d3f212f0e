"""`bitalloc export PLAN --to gguf|compressed-tensors`: a plan of GGUF types
written as a llama.cpp model file, or a plan of vLLM schemes as the
compressed-tensors folder vLLM serves and transformers loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import bitalloc.cli.argtypes as A
from bitalloc.cli.options import MODEL_HELP, calib_args
from bitalloc.cli.settings import load_for_plan, recorded_calibration
from bitalloc.errors import BitallocError
from bitalloc.export.gguf_plan import check_plan_types, export_gguf, source_gguf


def add_parser(sub) -> argparse.ArgumentParser:
    sx = sub.add_parser("export", help="write a plan of GGUF types as a llama.cpp file (and its recipe and imatrix), "
                                       "or a plan of vLLM schemes as a compressed-tensors folder")
    sx.add_argument("plan", help="plan.json from `bitalloc plan --format gguf` (--to gguf) or `--format vllm` "
                                 "(--to compressed-tensors)")
    sx.add_argument("--to", choices=("gguf", "compressed-tensors"), default="gguf",
                    help="gguf: a llama.cpp file (default); compressed-tensors: a Hugging Face folder with "
                         "quantization_config that vLLM serves and transformers loads")
    sx.add_argument("--model", help=MODEL_HELP + "; with --to gguf a .gguf file (llama.cpp's converter makes one "
                                                 "from a Hugging Face folder: convert_hf_to_gguf.py --outtype f16)")
    sx.add_argument("--out", required=True, help="the .gguf file (--to gguf) or folder (--to compressed-tensors) to "
                                                 "write, atomically")
    sx.add_argument("--tensor-types", help="also write the plan as llama-quantize --tensor-type-file lines here")
    sx.add_argument("--imatrix", help="also write the importance matrix here (GGUF imatrix, for llama-quantize "
                                      "--imatrix)")
    calib_args(sx)
    sx.add_argument("--encoding", type=A.encoding, help="encoding of a --calib-text file (default utf-8)")
    return sx


def run(args) -> None:
    from bitalloc.cli.checks import (
        CALIB_FLAGS,
        fill_defaults,
        given_flags,
    )
    from bitalloc.fileio import check_output_file
    from bitalloc.model.loading import resolve_source
    from bitalloc.plan import Plan

    plan = Plan.load(args.plan)
    if args.to == "compressed-tensors":
        return _run_compressed(args, plan)
    check_plan_types(plan, args.plan)
    source_gguf(resolve_source(args.model))
    calibrated = plan.uses_importance
    calib = given_flags(args, CALIB_FLAGS + (("--imatrix", "imatrix"),))
    if calib and not calibrated:
        raise BitallocError(f"{calib[0]} would be ignored: the plan {args.plan!r} was made without an importance "
                            "matrix (--no-imatrix), so nothing is calibrated.")
    if not given_flags(args, CALIB_FLAGS):
        recorded_calibration(args, plan)
    fill_defaults(args)
    outputs = [(p, f) for p, f in ((args.out, "--out"), (args.tensor_types, "--tensor-types"),
                                   (args.imatrix, "--imatrix")) if p]
    for path, flag in outputs:
        check_output_file(path, "bitalloc.report", flag=flag, overwrite=True)  # a folder or an unwritable place
        if Path(path).exists() and not args.overwrite:
            raise BitallocError(f"{flag} {path!r} already exists; bitalloc replaces it only with --overwrite. "
                                "Choose another path, or pass --overwrite.")
    settings, loaded = load_for_plan(args, plan, calibrated)
    info = export_gguf(args.plan, args.out, settings=settings, tensor_types=args.tensor_types, imatrix=args.imatrix,
                       progress=not args.quiet, loaded=loaded)
    print(f"wrote {info['path']}: {info['file_bytes'] / 1e6:.3f} MB; tensor data {info['tensor_data_bytes']:,} bytes "
          f"(planned units {int(info['plan_unit_bytes']):,} bytes, the rest norms and tensors copied as they are)")
    for key in ("tensor_types", "imatrix"):
        if key in info:
            print(f"wrote {info[key]}")


def _run_compressed(args, plan) -> None:
    """--to compressed-tensors: quantize per the plan (RTN or GPTQ, as it says) and write the folder."""
    from bitalloc import api
    from bitalloc.cli.checks import fill_defaults
    from bitalloc.cli.settings import notices, plan_calibration
    from bitalloc.export.compressed_tensors import MANIFEST, MANIFEST_FORMAT
    from bitalloc.fileio import check_output_dir

    for path, flag in ((args.tensor_types, "--tensor-types"), (args.imatrix, "--imatrix")):
        if path:
            raise BitallocError(f"{flag} would be ignored: it belongs to --to gguf (llama-quantize's inputs).")
    calibrated = plan_calibration(args, plan)
    fill_defaults(args)
    check_output_dir(args.out, MANIFEST, MANIFEST_FORMAT, flag="--out", overwrite=args.overwrite)
    settings, loaded = load_for_plan(args, plan, calibrated)
    info = api.quantize(plan_path=args.plan, out=args.out, progress=not args.quiet, settings=settings, loaded=loaded,
                        to="compressed-tensors")
    notices(info["notices"])
    s = info["sizes"]
    print(f"wrote {info['out']}: model.safetensors {info['file_bytes'] / 1e6:.3f} MB (compressed-tensors "
          f"pack-quantized); the plan realizes {s['quantized_bpw']:.4f} bpw over the quantized units, "
          f"{s['model_bpw']:.4f} over the whole model")
