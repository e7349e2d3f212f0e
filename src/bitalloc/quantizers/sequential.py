"""Sequential GPTQ in one pass, driven as the reference GPTQ drives it.

The calibration activations entering the first decoder block are captured
once. Then, block by block: the block's units get their Gram matrices
H = 2 X^T X / n from those activations (the block still unquantized, as in the
per-layer driver), are quantized and written back, and the now-quantized block
turns the activations into the next block's inputs. The model runs over the
calibration text once in all instead of once per block, and every block still
sees the activations of the blocks before it already quantized, so the result
equals the per-layer driver's.

Blocks are found from the unit names: a unit ``<stack>.<i>.<rest>`` lies in
block ``i`` of the ``nn.ModuleList`` at ``<stack>``. What a block receives
besides the hidden states (attention mask, rotary embeddings, cache position)
is captured at block 0 and reused for every block; the first window runs the
whole model once to check that assumption, and that each block's output is
the next block's input.

Failure: when the blocks cannot be chained this way (units in more than one
numbered stack, a stack that is not a ModuleList, blocks that receive
different arguments such as sliding-window masks, anything run between
blocks), ``LayerCaptureError`` (a ``BitallocError``) is raised before any
weight changes, so a caller may fall back to the per-layer driver. Units in
no numbered block (an untied head in a family without a table row) are
quantized last from a full-model forward, as the per-layer driver does; a
model with no numbered block gets only that full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bitalloc.calib.grams import UnitGrams
from bitalloc.errors import BitallocError
from bitalloc.formats.affine_rtn import QuantizedWeight, dequantize
from bitalloc.model.units import Inventory, StopForward, Unit, group_by_block, set_weight, stop_forward
from bitalloc.plan import Plan

# (model, unit, plan, H (in, in)) -> stored weight; bitalloc.quantizers.apply._quantize_unit
QuantizeUnit = Callable[[nn.Module, Unit, Plan, torch.Tensor], QuantizedWeight]


class LayerCaptureError(BitallocError):
    """The model's decoder blocks cannot be run one by one on captured inputs."""


@dataclass
class LayerStack:
    name: str  # module name of the ModuleList, e.g. "model.layers"; "" when there is none
    blocks: nn.ModuleList
    units: dict[int, list[Unit]]  # block index -> its units, in inventory order
    outside: list[Unit]  # units in no numbered block


@dataclass
class BlockInputs:
    """What a block receives for each calibration window. ``hidden`` is
    replaced by each block's output in turn; ``args`` (positional arguments
    after the hidden states) and ``kwargs`` are the same for every block."""

    hidden: list[torch.Tensor]  # per window: (1, seq, hidden)
    args: list[tuple]
    kwargs: list[dict]
    by_keyword: bool = False  # the hidden states came as the keyword 'hidden_states'

    def run(self, block: nn.Module, i: int) -> torch.Tensor:
        if self.by_keyword:
            return _hidden_of(block(*self.args[i], hidden_states=self.hidden[i], **self.kwargs[i]))
        return _hidden_of(block(self.hidden[i], *self.args[i], **self.kwargs[i]))  # (1, seq, hidden)


def layer_stack(model: nn.Module, units: tuple[Unit, ...]) -> LayerStack:
    """Group the units by numbered block and find the blocks' ModuleList."""
    groups = group_by_block(units)
    by_block, outside = groups.by_block, groups.outside
    if not by_block:
        return LayerStack("", nn.ModuleList(), {}, outside)
    if groups.stack is None:
        raise LayerCaptureError(f"Units lie in more than one stack of numbered blocks ({sorted(groups.stacks)}); "
                                "one-pass sequential GPTQ follows a single stack.")
    name = groups.stack
    blocks = model.get_submodule(name)
    if not isinstance(blocks, nn.ModuleList) or max(by_block) >= len(blocks):
        raise LayerCaptureError(f"{name!r} is not a list of blocks holding units up to block {max(by_block)}.")
    return LayerStack(name, blocks, by_block, outside)


def _hidden_of(output) -> torch.Tensor:
    """A block returns the hidden states, or a tuple that starts with them."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    """(hidden states, other positional args, kwargs, hidden came by keyword)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest, True
    raise LayerCaptureError("A block was called without hidden states as its first argument or 'hidden_states'.")


def _same(a, b) -> bool:
    """Equal values: the same object, equal tensors, or equal plain values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return False  # other objects (a KV cache) count as equal only when identical


def _first_difference(first: tuple[tuple, dict], other: tuple[tuple, dict]) -> str | None:
    """Name of the first argument in which two calls differ, or None."""
    (args0, kw0), (args1, kw1) = first, other
    if not _same(args0, args1):
        return "positional arguments"
    for key in sorted(set(kw0) | set(kw1)):
        if key not in kw0 or key not in kw1 or not _same(kw0[key], kw1[key]):
            return key
    return None


@torch.no_grad()
def check_chain(model: nn.Module, stack: LayerStack, row: torch.Tensor) -> None:
    """Run one window through the whole model and check what the one-pass
    driver assumes: blocks run in order, once each, at least up to the last
    one with units; each block's input is the previous block's output; every
    block gets block 0's other arguments."""
    state: dict = {"next": 0, "first": None, "output": None}

    def before(index: int):
        def hook(_module, args, kwargs):
            if index != state["next"]:
                raise LayerCaptureError(f"Block {index} of {stack.name!r} ran out of order.")
            hidden, rest, kw, _ = _split(args, kwargs)
            if index == 0:
                state["first"] = (rest, kw)
                return
            if not _same(hidden, state["output"]):
                raise LayerCaptureError(f"The input of block {index} of {stack.name!r} is not the output of block "
                                        f"{index - 1}: the model runs something between blocks.")
            key = _first_difference(state["first"], (rest, kw))
            if key is not None:
                raise LayerCaptureError(f"Block {index} of {stack.name!r} receives another {key!r} than block 0 "
                                        "(e.g. sliding-window attention); one-pass sequential GPTQ reuses block 0's.")

        return hook

    def after(index: int):
        def hook(_module, _args, output):
            state["output"], state["next"] = _hidden_of(output), index + 1

        return hook

    handles = [h for i, b in enumerate(stack.blocks)
               for h in (b.register_forward_pre_hook(before(i), with_kwargs=True), b.register_forward_hook(after(i)))]
    try:
        model(row[None, :], use_cache=False)  # no KV cache: blocks are re-run on the same inputs later
    finally:
        for h in handles:
            h.remove()
    last = max(stack.units)
    if state["next"] <= last:  # blocks after the last one with units need not run (e.g. extra prediction heads)
        raise LayerCaptureError(f"Only {state['next']} blocks of {stack.name!r} ran; units lie up to block {last}.")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, stack: LayerStack, windows: torch.Tensor,
                         progress: Callable | None = None) -> BlockInputs:
    """Block 0's inputs for every window; each forward stops at block 0."""
    inputs = BlockInputs([], [], [])

    def record(_module, args, kwargs):
        hidden, rest, kw, inputs.by_keyword = _split(args, kwargs)
        inputs.hidden.append(hidden)  # (1, seq, hidden)
        inputs.args.append(rest)
        inputs.kwargs.append(kw)
        raise StopForward

    rows = progress(list(windows), desc="capturing block inputs", unit="window") if progress else windows
    handle = stack.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for row in rows:
            try:
                model(row[None, :], use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def _last_input_module(model: nn.Module, units: list[Unit], run_first: Callable[[], object]) -> nn.Module | None:
    """Run the first window, recording the order in which the units' linears
    are called; the one called last, when every one is called exactly once
    (no experts, no module run twice), else None."""
    if any(u.lookup or u.index is not None for u in units):
        return None
    calls: list[str] = []
    handles = [model.get_submodule(u.name).register_forward_pre_hook(lambda _m, _a, n=u.name: calls.append(n))
               for u in units]
    try:
        run_first()
    finally:
        for h in handles:
            h.remove()
    once = len(calls) == len(units) and set(calls) == {u.name for u in units}
    return model.get_submodule(calls[-1]) if once else None




@torch.no_grad()
def block_hessians(model: nn.Module, block: nn.Module, units: list[Unit], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n of each unit's input, from the block's captured inputs.
    After the first window, each forward stops as soon as the last unit's
    input is seen (its Gram hook runs first): the block's output is not needed."""
    acc = UnitGrams(model, units)
    handle = None
    try:
        last = _last_input_module(model, units, lambda: inputs.run(block, 0)) if inputs.hidden else None
        handle = last.register_forward_pre_hook(stop_forward) if last is not None else None
        for i in range(1, len(inputs.hidden)):
            try:
                inputs.run(block, i)
            except StopForward:
                pass
    finally:
        acc.remove()
        if handle is not None:
            handle.remove()
    return acc.hessians()


@torch.no_grad()
def advance(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace each window's hidden states by the block's output, in place,
    so only one set of activations is held."""
    for i in range(len(inputs.hidden)):
        inputs.hidden[i] = inputs.run(block, i)  # (1, seq, hidden)


@torch.no_grad()
def full_forward_hessians(model: nn.Module, units: list[Unit], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """H of units in no numbered block, from whole-model forwards (as the per-layer driver)."""
    acc = UnitGrams(model, units)  # a lookup embedding has no Gram
    try:
        for row in windows:
            model(row[None, :])
    finally:
        acc.remove()
    return acc.hessians()


def quantize_units(model: nn.Module, units: list[Unit], plan: Plan, hessians: dict[str, torch.Tensor],
                   quantize_unit: QuantizeUnit) -> dict[str, QuantizedWeight]:
    """Quantize each unit with its Gram, put the dequantized weight in place
    (later units see it) and return the stored forms: the step both
    sequential drivers take once a block's Grams are measured."""
    stored = {}
    for unit in units:
        qw = quantize_unit(model, unit, plan, hessians.get(unit.name))
        set_weight(model, unit, dequantize(qw))
        stored[unit.name] = qw
    return stored


def quantize_sequential(model: nn.Module, inventory: Inventory, plan: Plan, windows: torch.Tensor,
                        quantize_unit: QuantizeUnit, progress: Callable | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every unit in place, block by block, in one forward over
    ``windows`` (windows, seq_len) token ids; return each unit's stored form.
    Raises ``LayerCaptureError`` (nothing changed yet) when the blocks cannot
    be chained; see the module docstring."""
    stack = layer_stack(model, inventory.units)
    last = max(stack.units, default=-1)  # no block after the last one with units needs to run
    inputs = None
    if stack.units:
        check_chain(model, stack, windows[0])
        inputs = capture_block_inputs(model, stack, windows, progress)
    steps: list[int | None] = list(range(last + 1)) + ([None] if stack.outside else [])
    stored: dict[str, QuantizedWeight] = {}
    for step in progress(steps, desc="quantizing (sequential GPTQ)", unit="layer") if progress else steps:
        if step is None:
            inputs = None  # free the activations before the full forwards
            hessians = full_forward_hessians(model, stack.outside, windows)
            stored.update(quantize_units(model, stack.outside, plan, hessians, quantize_unit))
            continue
        block, units = stack.blocks[step], stack.units.get(step, [])
        if units:
            hessians = block_hessians(model, block, units, inputs)
            stored.update(quantize_units(model, units, plan, hessians, quantize_unit))
        if step < last:
            advance(block, inputs)  # the quantized block makes the next block's inputs
    return stored
