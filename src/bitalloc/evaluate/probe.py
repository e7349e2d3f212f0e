"""Calibration probes: the model quantized per a plan, in memory, measured on
a few windows of *calibration* text against the reference's distribution.

``CalibrationProbe`` answers "what is the KL (and NLL) of this assignment?"
and "what does it become when this unit alone moves to that option, the rest
of the plan in place?". The second question is asked hundreds of times by the
refinement, so it is made cheap:

- all windows run as one batch;
- the hidden states entering every decoder block are kept from the last full
  forward, so a probe of a unit in block L runs blocks L.. only (the blocks
  before L are unchanged). The block list is swapped for its tail for the
  duration of the call and block L's input replaced by the kept one; this is
  checked once against a full forward and switched off, with the full
  forward used instead, when it does not reproduce it (models whose blocks
  need their absolute index, e.g. sliding-window layer types).
- ``block_error`` answers a block-local question instead: how far the
  unit's own block output moves, that block run alone on its kept input
  (a forward of one block instead of the tail and the output matrix);
  available where one block's output is checked to be the next one's input.
- quantized weights are kept per (unit, option), computed once;
- a unit's original weight is copied only while the unit holds something
  else (the model holds it otherwise): a copy of every unit up front was a
  second float32 model per probe, which ran a 1.5B model with a table probe
  and the guard's probe (22 GB) out of memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, spread_windows, token_windows
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import Inventory, Unit, get_weight, group_by_block, layer_index, set_weight

# (unit, its original (out, in) weight, option) -> dequantized (out, in) weight
QuantizeWeight = Callable[[Unit, torch.Tensor, QuantOption], torch.Tensor]
CHECK_TOLERANCE = 1e-4  # relative difference of KL allowed between tail-only and full forwards
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # a decoder block's KV-cache argument, by version


@dataclass(frozen=True)
class Measure:
    kl: float  # mean KL(reference || model) per predicted token, nats
    nll: float  # mean negative log-likelihood per predicted token, nats

    def value(self, objective: str) -> float:
        return self.kl if objective == "kl" else self.nll


class CalibrationProbe:
    """Owns the model's unit weights between ``apply`` and ``restore``: it
    tracks which option each unit holds, so nothing else may change them in
    between (``restore`` puts the original weights back)."""

    def __init__(self, model: nn.Module, tokenizer, inventory: Inventory, text: str, *, windows: int,
                 seq_len: int, quantize_weight: QuantizeWeight, clear_of: EvalSettings | None = None,
                 cache_weights: bool = True):
        self.model, self.inventory, self.quantize_weight = model, inventory, quantize_weight
        # refinement revisits options, so their quantized weights are kept; a probe that measures each plan once
        # (the guard) keeps none: two plans' worth of float32 copies is twice the model (OOM on a 1.5B model)
        self.cache_weights = cache_weights
        settings = EvalSettings(seq_len, windows, "auto")
        # the text's first windows; with clear_of, in the gaps between those (spread) calibration windows
        self.windows = token_windows(tokenizer, text, settings) if clear_of is None else \
            spread_windows(tokenizer, text, settings, clear_of, "fewer --refine-windows, a shorter --refine-seq-len")
        self._saved: dict[str, torch.Tensor] = {}  # unit -> its original (out, in), while the model holds another
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.current: dict[str, QuantOption | None] = {u.name: None for u in inventory.units}
        self.ref_logp = self._logprobs()  # (B, T-1, V) of the model as loaded
        self.stack = block_stack(model, inventory)
        self._inputs: dict[int, torch.Tensor] = {}
        self._calls: dict[int, tuple[tuple, dict]] = {}  # block -> its other arguments in the last full forward
        self._outputs: dict[int, torch.Tensor] = {}  # block -> its output on the kept input, the current assignment
        self.tail_ok = False
        self.block_ok = False

    # ---- weights -----------------------------------------------------------
    def original(self, unit: Unit) -> torch.Tensor:
        """The unit's weight as loaded, (out, in): the copy kept while the
        unit holds something else, else a copy of the model's own."""
        saved = self._saved.get(unit.name)
        return saved if saved is not None else get_weight(self.model, unit)

    def weight(self, unit: Unit, option: QuantOption | None) -> torch.Tensor:
        if option is None:
            return self.original(unit)
        key = (unit.name, option.name)
        if not self.cache_weights:
            return self.quantize_weight(unit, self.original(unit), option)
        if key not in self._cache:
            self._cache[key] = self.quantize_weight(unit, self.original(unit), option)
        return self._cache[key]

    def _put(self, unit: Unit, W: torch.Tensor) -> None:
        """Write ``W`` into the model, the unit's original kept until it is put back."""
        if unit.name not in self._saved:  # not saved: the model holds the original
            self._saved[unit.name] = get_weight(self.model, unit)
        set_weight(self.model, unit, W)

    def _put_back(self, unit: Unit) -> None:
        """The unit's current option (None: its original) back in the model."""
        option = self.current[unit.name]
        set_weight(self.model, unit, self.weight(unit, option))
        if option is None:
            self._saved.pop(unit.name, None)  # the model holds the original again

    def apply(self, assignment: dict[str, QuantOption | None]) -> None:
        """Put every unit at its option (None: the original weight)."""
        for u in self.inventory.units:
            opt = assignment.get(u.name)
            if self.current[u.name] != opt:
                if opt is None:
                    self.current[u.name] = None
                    self._put_back(u)
                else:
                    self._put(u, self.weight(u, opt))
                    self.current[u.name] = opt
        self._inputs, self._calls, self._outputs = {}, {}, {}

    def restore(self) -> None:
        self.apply({})

    # ---- measuring -----------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self) -> torch.Tensor:
        logits = self.model(self.windows).logits[:, :-1].float()  # (B, T-1, V)
        return F.log_softmax(logits, dim=-1)

    def _score(self, logp: torch.Tensor) -> Measure:
        n = logp.shape[0] * logp.shape[1]
        kl = float((self.ref_logp.exp() * (self.ref_logp - logp)).sum()) / n
        nll = float(-logp.gather(-1, self.windows[:, 1:, None]).sum()) / n
        return Measure(kl, nll)

    @torch.no_grad()
    def measure(self) -> Measure:
        """The current assignment, by a full forward that also keeps every
        block's input for later tail-only probes."""
        with self._keep_inputs():
            logp = self._logprobs()
        return self._score(logp)

    @torch.no_grad()
    def measure_moved(self, units: list[Unit], option: QuantOption) -> Measure:
        """The current assignment with ``units`` moved to ``option``, then put back."""
        first = min((layer_index(u.name) for u in units), key=lambda i: -1 if i is None else i)
        for u in units:
            self._put(u, self.weight(u, option))
        try:
            if self.tail_ok and first is not None and first in self._inputs:
                return self._score(self._tail_logprobs(first))
            return self._score(self._logprobs())
        finally:
            for u in units:
                self._put_back(u)

    @torch.no_grad()
    def measure_weight(self, unit: Unit, W_new: torch.Tensor) -> Measure:
        """The current assignment with one unit's weight replaced by ``W_new``
        (out, in), then put back."""
        index = layer_index(unit.name)
        self._put(unit, W_new)
        try:
            if self.tail_ok and index is not None and index in self._inputs:
                return self._score(self._tail_logprobs(index))
            return self._score(self._logprobs())
        finally:
            self._put_back(unit)

    @torch.no_grad()
    def block_error(self, unit: Unit, W_new: torch.Tensor) -> float:
        """The current assignment with one unit's weight replaced by ``W_new``:
        the squared change of its block's output (summed over the hidden
        size, mean per token), that block run alone on its kept input."""
        index = layer_index(unit.name)
        if not self.block_ok or index is None or index not in self._inputs:
            raise BitallocError(f"A block-local probe of {unit.name!r} needs its block's kept input, and blocks whose "
                                "output is the next block's input; this model does not give them. Use the kl scorer "
                                "(end-to-end probes) instead.")
        if index not in self._outputs:
            self._outputs[index] = self._block_output(index)
        self._put(unit, W_new)
        try:
            moved = self._block_output(index)
        finally:
            self._put_back(unit)
        diff = (moved - self._outputs[index]).double()
        return float((diff * diff).sum()) / (diff.numel() // diff.shape[-1])

    def enable_tail(self) -> bool:
        """Switch on tail-only probes if they reproduce a full forward here,
        and block-local ones if a block run alone gives the next block's
        input."""
        if self.stack is None or len(self.stack[1]) < 2:
            return False
        full = self.measure()
        middle = len(self.stack[1]) // 2
        tail = self._score(self._tail_logprobs(middle))
        self.tail_ok = (abs(tail.kl - full.kl) <= CHECK_TOLERANCE * max(full.kl, 1e-6) + 1e-7
                        and abs(tail.nll - full.nll) <= CHECK_TOLERANCE * full.nll)
        try:
            alone, following = self._block_output(middle - 1), self._inputs[middle]
            self.block_ok = bool(torch.allclose(alone, following, rtol=CHECK_TOLERANCE, atol=1e-6))
        except (TypeError, ValueError, RuntimeError, KeyError):  # a block that cannot run alone
            self.block_ok = False
        return self.tail_ok

    # ---- block bookkeeping -------------------------------------------------
    @contextlib.contextmanager
    def _keep_inputs(self) -> Iterator[None]:
        self._inputs, self._calls, self._outputs = {}, {}, {}
        if self.stack is None:
            yield
            return
        hooks = [block.register_forward_pre_hook(self._keeper(i), with_kwargs=True)
                 for i, block in enumerate(self.stack[1])]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _keeper(self, index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._inputs[index] = hidden.detach()
            # the rest of the call (mask, rotary embeddings), without the KV cache: a block run alone again must
            # not append to it
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _CACHE_ARGS}
            self._calls[index] = (tuple(args[1:]), {**rest, "use_cache": False} if "use_cache" in kwargs else rest)
        return hook

    def _block_output(self, index: int) -> torch.Tensor:
        """Block ``index`` run alone on its kept input, with the arguments of the last full forward."""
        args, kwargs = self._calls[index]
        out = self.stack[1][index](self._inputs[index], *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _tail_logprobs(self, first: int) -> torch.Tensor:
        parent, blocks, attr = self.stack
        kept = self._inputs[first]

        def replace_input(_module, args, kwargs):
            if args:
                return (kept, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kept}

        handle = blocks[first].register_forward_pre_hook(replace_input, with_kwargs=True)
        setattr(parent, attr, nn.ModuleList(list(blocks)[first:]))
        try:
            return self._logprobs()
        finally:
            setattr(parent, attr, blocks)
            handle.remove()


def block_stack(model: nn.Module, inventory: Inventory) -> tuple[nn.Module, nn.ModuleList, str] | None:
    """(parent module, its ModuleList of decoder blocks, attribute name), from
    the unit names ``<stack>.<i>.<rest>``; None when there is no one stack."""
    name = group_by_block(inventory.units).stack
    if name is None:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr, None)
    return (parent, blocks, attr) if isinstance(blocks, nn.ModuleList) else None
