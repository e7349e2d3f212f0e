"""Apply a plan: round-to-nearest every unit to its option, in memory, and
save/load the quantized model as safetensors (bit-packed codes, fp16 scales
and zeros, kept tensors at ``keep_bits``) + plan.json + config + tokenizer.
Loading a saved folder reproduces the in-memory weights exactly."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.affine_rtn import (
    QuantizedWeight,
    dequantize,
    packed_weight,
)
from bitalloc.model.units import (
    Inventory,
    StopForward,
    Unit,
    check_finite,
    get_weight,
    group_by_block,
    set_weight,
    stop_forward,
)
from bitalloc.plan import Plan
from bitalloc.quantizers import quantizer

KEEP_DTYPES = {16: torch.float16, 32: torch.float32}


def keep_dtype(bits: int) -> torch.dtype:
    if bits not in KEEP_DTYPES:
        raise BitallocError(f"The 'keep_bits' parameter must be one of {sorted(KEEP_DTYPES)}. Got {bits} instead.")
    return KEEP_DTYPES[bits]


def quantize_model(model, inventory: Inventory, plan: Plan, *, hessians: dict[str, torch.Tensor] | None = None,
                   cache: dict | None = None, calib_windows: torch.Tensor | None = None,
                   progress: Callable | None = None, importance: dict[str, torch.Tensor] | None = None) -> dict:
    """Quantize in place per the plan (units by RTN or GPTQ; kept tensors
    rounded to keep_bits) and return the stored form of each unit. ``cache``
    keeps one-shot GPTQ results per (unit, option) for reuse across plans;
    sequential GPTQ measures each layer's Hessians from ``calib_windows``
    after the layers before it are quantized. A unit planned at a GGUF type
    is quantized by ggml, weighing errors by ``importance[unit]`` (in,)."""
    plan.check_model(inventory)
    importance = (importance or {}) if plan.uses_importance else {}

    def quantize_unit(model, unit: Unit, plan: Plan, H: torch.Tensor | None):
        return _quantize_unit(model, unit, plan, H, importance.get(unit.name))

    q = quantizer(plan.quantizer)
    if q.sequential and plan.sequential:
        if calib_windows is None:
            raise BitallocError("Sequential GPTQ needs calibration windows; quantize through bitalloc.api.")
        from bitalloc.quantizers.sequential import LayerCaptureError, quantize_sequential

        try:  # one pass over the calibration text, block by block
            stored = quantize_sequential(model, inventory, plan, calib_windows, quantize_unit, progress)
        except LayerCaptureError:  # blocks that cannot be chained (e.g. sliding-window layers): one pass per block
            stored = _quantize_sequential(model, inventory, plan, calib_windows, quantize_unit, progress)
    else:
        if q.calibrated and hessians is None:
            raise BitallocError("A GPTQ plan needs calibration Hessians; quantize through bitalloc.api, which computes them.")
        units = progress(inventory.units, desc=f"quantizing ({plan.quantizer})", unit="tensor") if progress else inventory.units
        stored = {}
        for unit in units:
            key = (unit.name, plan.assignment[unit.name].name, plan.act_order, plan.column_bits.get(unit.name))
            if q.calibrated and cache is not None and key in cache:
                qw = cache[key]
            else:
                qw = quantize_unit(model, unit, plan, None if hessians is None else hessians.get(unit.name))
                if q.calibrated and cache is not None:
                    cache[key] = qw
            set_weight(model, unit, dequantized(qw))
            stored[unit.name] = qw
    dtype = keep_dtype(plan.keep_bits)
    with torch.no_grad():
        for kept in inventory.kept:
            p = model.get_parameter(kept.name)
            p.copy_(p.to(dtype).to(p.dtype))
    return stored


def quantize_streamed(weight: Callable[[Unit], torch.Tensor], inventory: Inventory, plan: Plan, *,
                      progress: Callable | None = None) -> dict:
    """The stored form of every unit of a data-free plan, codes bit-packed,
    each weight read from disk by ``weight(unit)`` and dropped once stored:
    the model is never resident (``model.source``). Calibrated plans (GPTQ, importance
    matrix) need forward passes and are refused."""
    plan.check_model(inventory)
    if quantizer(plan.quantizer).calibrated or plan.uses_importance:
        raise BitallocError("A streamed model is quantized without calibration: this plan needs "
                            f"{'GPTQ' if quantizer(plan.quantizer).calibrated else 'an importance matrix'}. Plan with "
                            "--stream (RTN, no importance matrix), or quantize without --stream.")
    units = progress(inventory.units, desc="quantizing (streamed)", unit="tensor") if progress else inventory.units
    return {unit.name: packed_weight(store_unit(weight(unit), unit, plan)) for unit in units}


def dequantized(stored) -> torch.Tensor:
    """Float32 (out, in) weight from any stored form (integer codes or ggml bytes)."""
    if isinstance(stored, QuantizedWeight):
        return dequantize(stored)
    from bitalloc.formats.gguf_types import GGUFType

    return torch.from_numpy(GGUFType(stored.type_name).dequantize(stored))


def _quantize_unit(model, unit: Unit, plan: Plan, H: torch.Tensor | None, importance: torch.Tensor | None = None):
    """The stored form of one unit of the loaded model (``store_unit``)."""
    return store_unit(get_weight(model, unit), unit, plan, H, importance)


def store_unit(W: torch.Tensor, unit: Unit, plan: Plan, H: torch.Tensor | None = None,
               importance: torch.Tensor | None = None):
    """The stored form of one unit's (out, in) weight: integer codes (RTN, or
    GPTQ given the unit's Hessian; a token embedding read by lookup has none
    and is rounded to nearest, which is what GPTQ does without input
    correlation), or ggml's bytes for a GGUF type."""
    check_finite(W, unit)
    opt, bits = plan.assignment[unit.name], plan.column_bits.get(unit.name)
    if not opt.is_affine:  # a GGUF type: ggml's quantizer
        return opt.quantize(W, importance if opt.uses_importance else None)
    return quantizer(plan.quantizer).store(W, opt, H=H, act_order=plan.act_order, allow_ragged=plan.allow_ragged,
                                           column_bits=bits, importance=importance, search=plan.uses_importance)


def _quantize_sequential(model, inventory: Inventory, plan: Plan, windows: torch.Tensor, quantize_unit: Callable,
                         progress: Callable | None) -> dict[str, QuantizedWeight]:
    """Layer by layer: Gram matrices of this layer's inputs from the model with
    every earlier layer already quantized (the forward stops after this
    layer), then GPTQ on this layer's units. Units outside numbered layers go last."""
    from bitalloc.calib.grams import UnitGrams
    from bitalloc.quantizers.sequential import quantize_units

    groups = group_by_block(inventory.units)
    by_layer: dict[int | None, list[Unit]] = {**groups.by_block, **({None: groups.outside} if groups.outside else {})}
    order = sorted(groups.by_block) + ([None] if groups.outside else [])
    stored: dict[str, QuantizedWeight] = {}
    for layer in progress(order, desc="quantizing (sequential GPTQ)", unit="layer") if progress else order:
        units = by_layer[layer]
        acc = UnitGrams(model, units)
        block = None
        if layer is not None:
            block = model.get_submodule(units[0].name.split(f".{layer}.")[0] + f".{layer}")
        stop = block.register_forward_hook(stop_forward) if block is not None else None
        try:
            with torch.no_grad():
                for row in windows:
                    try:
                        model(row[None, :])
                    except StopForward:
                        pass
        finally:
            acc.remove()
            if stop is not None:
                stop.remove()
        stored.update(quantize_units(model, units, plan, acc.hessians(), quantize_unit))
    return stored


@contextlib.contextmanager
def restored(model) -> Iterator[None]:
    """Run a block that changes weights in place, then put the originals back."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


