"""Quantizers: how the stored codes of an integer affine option are chosen.

The registry ``QUANTIZERS`` holds one row per quantizer: what it needs
(calibration Grams), what it can do (order columns, run block by block on
quantized inputs, store GGUF types) and the function that stores one weight.
Code elsewhere asks these questions of a row (``quantizer(name).calibrated``)
and never compares a quantizer's name; a new quantizer is one module and one
line here. The plan applier is ``apply.py``; sequential GPTQ's block walk is
``sequential.py``. Nothing here imports scorer code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from bitalloc.errors import BitallocError


def _rtn(W, option, *, H=None, damp: float = 0.01, act_order: bool = False, allow_ragged: bool = False,
         column_bits=None, importance=None, search: bool = False):
    """Round to nearest; with ``importance`` (in,), each group's scale by the weighted search."""
    from bitalloc.formats.affine_rtn import quantize_rtn

    return quantize_rtn(W, option, allow_ragged=allow_ragged, column_bits=column_bits, importance=importance)


def _gptq(W, option, *, H=None, damp: float = 0.01, act_order: bool = False, allow_ragged: bool = False,
          column_bits=None, importance=None, search: bool = False):
    """GPTQ given the unit's Gram H (in, in); a unit without one (a token
    embedding, read by lookup) is rounded to nearest, which is what GPTQ does
    without input correlation."""
    if H is None:
        return _rtn(W, option, allow_ragged=allow_ragged, column_bits=column_bits, importance=importance)
    from bitalloc.quantizers.gptq import gptq_quantize

    return gptq_quantize(W, H, option, damp=damp, act_order=act_order, allow_ragged=allow_ragged,
                         column_bits=column_bits, search=search)[0]


@dataclass(frozen=True)
class Quantizer:
    name: str
    calibrated: bool  # needs each unit's calibration Gram H = 2 X^T X / n
    orders_columns: bool  # --act-order applies
    sequential: bool  # can run block by block on the quantized model's own inputs
    gguf: bool  # can store GGUF types too (ggml quantizes them; GPTQ is integer affine only)
    tag: str  # in measurement cache keys and labels: "" for the default, "-<name>" otherwise
    store: Callable[..., Any]  # (W, option, *, H, damp, act_order, allow_ragged, column_bits, importance, search)


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": Quantizer("rtn", calibrated=False, orders_columns=False, sequential=False, gguf=True, tag="", store=_rtn),
    "gptq": Quantizer("gptq", calibrated=True, orders_columns=True, sequential=True, gguf=False, tag="-gptq",
                      store=_gptq),
}


def quantizer(name: str) -> Quantizer:
    """The registry row of ``name``; an unknown name is one clear error."""
    try:
        return QUANTIZERS[name]
    except (KeyError, TypeError):
        raise BitallocError(f"Unknown quantizer {name!r}; choose from {', '.join(QUANTIZERS)}.") from None


def stored_weight(name: str, W, option, *, H=None, importance=None, search: bool = False, act_order: bool = False,
                  allow_ragged: bool = False, damp: float = 0.01):
    """W after a round trip through storage, as quantizer ``name`` stores it
    at ``option``: a calibrated quantizer given the unit's Gram ``H`` (GPTQ,
    scales searched by diag(H) when ``search``); otherwise rounded to nearest
    in any format (ggml for a GGUF type), weighing errors by ``importance``
    (in,) where the format uses one. What the probes, refinement and the
    guard measure a candidate weight by."""
    q = quantizer(name)
    if q.calibrated and H is not None and option.is_affine:
        from bitalloc.formats.affine_rtn import dequantize

        return dequantize(q.store(W, option, H=H, damp=damp, act_order=act_order, allow_ragged=allow_ragged,
                                  search=search))
    from bitalloc.formats.affine_rtn import fake_quantize

    return fake_quantize(W, option, allow_ragged=allow_ragged, importance=importance)


def any_calibrated(names: Iterable[str] | None) -> bool:
    """Whether any of ``names`` needs calibration Grams."""
    return any(quantizer(n).calibrated for n in names or ())


def gathers_every_gram(name: str, sequential: bool) -> bool:
    """Whether quantizing with ``name`` needs every unit's Gram matrix at
    once: a calibrated quantizer run one-shot. Run sequentially it measures
    one block's Grams at a time (all of a 1.5B model's, in float64, are
    18 GB)."""
    q = quantizer(name)
    return q.calibrated and not (sequential and q.sequential)


def any_sequential(names: Iterable[str] | None) -> bool:
    return any(quantizer(n).sequential for n in names or ())


def any_orders_columns(names: Iterable[str] | None) -> bool:
    return any(quantizer(n).orders_columns for n in names or ())
