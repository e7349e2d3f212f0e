"""Command line: `bitalloc plan | quantize | export | eval | run | compare | kv | demo`.

One module per command (``cli/plan.py`` …), each with its ``add_parser``
and its ``run``; ``COMMANDS`` is their registry. Every argument is checked
while it is parsed (``argtypes``) or, when it depends on another argument or
a file, by ``checks`` before any model is loaded; ``settings`` turns the
parsed arguments into the typed, frozen settings the library takes, so no
argparse Namespace leaves this package. Errors are one line on stderr with
exit code 2 (bad input) or 1 (a runtime that crashed under us).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Callable, NamedTuple

import bitalloc.cli.argtypes as A
import bitalloc.cli.compare as compare
import bitalloc.cli.demo as demo
import bitalloc.cli.eval as eval_
import bitalloc.cli.export as export
import bitalloc.cli.kv as kv
import bitalloc.cli.plan as plan
import bitalloc.cli.quantize as quantize
import bitalloc.cli.run as run_
from bitalloc.cli.options import overwrite_arg
from bitalloc.errors import BitallocError


class Command(NamedTuple):
    add_parser: Callable  # (subparsers) -> the command's ArgumentParser
    run: Callable  # (parsed arguments) -> None


COMMANDS = {module.__name__.rpartition(".")[2]: Command(module.add_parser, module.run)
            for module in (plan, quantize, export, eval_, run_, compare, kv, demo)}


def build_parser() -> argparse.ArgumentParser:
    p = A.OneLineParser(prog="bitalloc", description=(
        "Allocate bits across a model's weights for a memory budget, quantize, evaluate. "
        "Pipeline: load -> units -> error table -> plan -> quantize -> eval."))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        overwrite_arg(command.add_parser(sub))
    return p


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
        COMMANDS[args.command].run(args)
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
