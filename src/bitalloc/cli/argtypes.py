"""Argument types for the command line: each parses one value, checks its
range and says, in one line, what was given and what is allowed. They run
while the arguments are parsed, before any model is loaded."""

from __future__ import annotations

import argparse
import math

from bitalloc.formats.affine import SUPPORTED_BITS

MAX_BPW = 32.0  # no stored format spends more than fp32
MIN_GROUP, MAX_GROUP, GROUP_STEP = 16, 8192, 16  # group sizes: multiples of 16 (or 'channel')
MAX_WINDOWS = 100_000


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look)
    and exits with 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _bad(what: str, text: str, allowed: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{what} must be {allowed}; got {text!r}")


def _number(text: str, what: str, allowed: str) -> float:
    if "_" in text:  # Python reads 0_5 as 5: a typo for 0.5 must not become 5
        raise _bad(what, text, allowed + " (digits without '_')")
    try:
        value = float(text)
    except ValueError:
        raise _bad(what, text, allowed) from None
    if not math.isfinite(value):
        raise _bad(what, text, allowed)
    return value


def bpw(text: str) -> float:
    allowed = f"a finite number of bits per weight above 0 and at most {MAX_BPW:g}"
    value = _number(text, "a budget", allowed)
    if not 0 < value <= MAX_BPW:
        raise _bad("a budget", text, allowed)
    return value


def bpw_list(text: str) -> tuple[float, ...]:
    parts = [t.strip() for t in text.split(",")]
    if not all(parts):
        raise _bad("--bpw", text, "one or more budgets, comma separated, e.g. 3.5 or 3.25,4.5")
    values = tuple(bpw(t) for t in parts)
    if len(set(values)) != len(values):
        raise _bad("--bpw", text, "distinct budgets")
    return values


def budget_bytes(text: str) -> float:
    allowed = "a whole number of bytes above 0, e.g. 100e6"
    value = _number(text, "--bytes", allowed)
    if value <= 0 or value != int(value):
        raise _bad("--bytes", text, allowed)
    return value


def positive_int(limit: int = MAX_WINDOWS, low: int = 1):
    def parse(text: str) -> int:
        allowed = f"a whole number from {low} to {limit}"
        if "_" in text:
            raise _bad("the value", text, allowed + " (digits without '_')")
        try:
            value = int(text)
        except ValueError:
            raise _bad("the value", text, allowed) from None
        if not low <= value <= limit:
            raise _bad("the value", text, allowed)
        return value

    return parse


def int_choice(choices: tuple[int, ...]):
    def parse(text: str) -> int:
        allowed = f"one of {', '.join(map(str, choices))}"
        if "_" in text or not text.strip().lstrip("-").isdigit() or int(text) not in choices:
            raise _bad("the value", text, allowed)
        return int(text)

    return parse


def bits_value(text: str) -> int:
    allowed = f"one of {list(SUPPORTED_BITS)}"
    if "_" in text:
        raise _bad("a bit-width", text, allowed)
    try:
        value = int(text)
    except ValueError:
        raise _bad("a bit-width", text, allowed) from None
    if value not in SUPPORTED_BITS:
        raise _bad("a bit-width", text, allowed)
    return value


def bits_list(text: str) -> tuple[int, ...]:
    values = tuple(bits_value(t.strip()) for t in text.split(","))
    if len(set(values)) != len(values):
        raise _bad("--bits", text, "distinct bit-widths")
    return values


def group_sizes(text: str) -> tuple[int, ...]:
    allowed = (f"'channel' or multiples of {GROUP_STEP} from {MIN_GROUP} to {MAX_GROUP}, comma separated "
               "(e.g. 32,64,channel)")
    out = []
    for tok in (t.strip().lower() for t in text.split(",")):
        if tok in ("channel", "per-channel", "pc"):
            out.append(0)
            continue
        if not tok.isdigit() or int(tok) % GROUP_STEP or not MIN_GROUP <= int(tok) <= MAX_GROUP:
            raise _bad("a group size", tok, allowed)
        out.append(int(tok))
    if len(set(out)) != len(out):
        raise _bad("--group-sizes", text, "distinct group sizes")
    return tuple(out)


def schemes(text: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(","))
    if not out or any(s not in ("asym", "sym") for s in out) or len(set(out)) != len(out):
        raise _bad("--schemes", text, "asym, sym or asym,sym")
    return out


def finite(text: str) -> float:
    return _number(text, "the value", "a finite number")


def encoding(text: str) -> str:
    from bitalloc.errors import BitallocError
    from bitalloc.evaluate.text import check_encoding

    try:
        return check_encoding(text)
    except BitallocError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name_list(text: str) -> tuple[str, ...]:
    """'Q4_K,q5_k, IQ4_XS' -> ('Q4_K', 'Q5_K', 'IQ4_XS'): GGUF type names, checked later against ggml."""
    names = tuple(t.strip().upper() for t in text.split(",") if t.strip())
    if not names:
        raise _bad("a list of GGUF types", text, "e.g. Q4_K,Q5_K,Q8_0")
    return names
