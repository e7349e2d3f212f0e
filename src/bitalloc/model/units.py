"""Units: what receives one bit-width, found by a generic walk over the model.

A unit is a 2-D weight seen as (out, in): an ``nn.Linear`` weight, a GPT-2
``Conv1D`` weight (stored (in, out), so transposed), or one slice ``[e]`` of a
fused 3-D expert parameter (E, out, in) -- for a fused ``gate_up_proj`` each
half of the slice, ``[e].gate`` and ``[e].up``, as checkpoints on disk and
llama.cpp store them. Everything else in the state dict is *kept* at a fixed
precision and still counted in the model's size.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitalloc.errors import BadWeightsError
from bitalloc.model.archs import EXPERT_PART, FUSED_HALVES, GENERIC, ArchSpec, arch_for, arch_of_family


@dataclass(frozen=True)
class Unit:
    name: str  # module FQN, or "<param FQN>[e]" for an expert slice
    param: str  # full parameter name in the state dict
    shape: tuple[int, int]  # (out, in)
    index: int | None = None  # slice of a 3-D parameter
    transposed: bool = False  # stored as (in, out), e.g. GPT-2 Conv1D
    lookup: bool = False  # a token embedding read row by row: no input Gram matrix
    rows: tuple[int, int] | None = None  # a row range of the slice: one half of a fused gate_up_proj

    @property
    def part(self) -> str | None:
        """An expert slice's projection: "gate", "up" (halves of a fused gate_up_proj), "down"; else None."""
        if self.index is None:
            return None
        return self.name.rsplit(".", 1)[1] if self.rows else EXPERT_PART.get(self.param.rsplit(".", 1)[1])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class KeptTensor:
    name: str
    numel: int


@dataclass(frozen=True)
class Inventory:
    """What a model holds: units to quantize, tensors kept, ties, identity."""

    units: tuple[Unit, ...]
    kept: tuple[KeptTensor, ...]
    tie_groups: tuple[tuple[str, tuple[str, ...]], ...]  # (tie name, unit names sharing one option)
    arch: str
    model_type: str
    identity: str  # architecture: parameter names and shapes
    notices: tuple[str, ...] = ()
    more_bits: tuple[str, ...] = ()  # unit names llama.cpp's Q4_K_M rule promotes
    content_id: str = ""  # this checkpoint's weights (a fine-tune of the same architecture differs)
    embedding_units: tuple[str, ...] = ()  # units holding the token embedding or the output matrix

    @property
    def quantized_numel(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def kept_numel(self) -> int:
        return sum(k.numel for k in self.kept)

    def unit(self, name: str) -> Unit:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, Unit]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {u.name: u for u in self.units}
            object.__setattr__(self, "_cache", cache)
        return cache

    def disk_key(self, name: str) -> str | None:
        """The per-expert key a checkpoint on disk stores this expert slice under, or None for other units."""
        return disk_key(self.unit(name), arch_of_family(self.arch))

    def unit_for_disk_key(self, key: str) -> str | None:
        """The unit (expert slice) an on-disk per-expert key holds, or None."""
        keys = self.__dict__.get("_keys")
        if keys is None:
            spec = arch_of_family(self.arch)
            keys = {k: u.name for u in self.units if (k := disk_key(u, spec))}
            object.__setattr__(self, "_keys", keys)
        return keys.get(key)

    def matching(self, pattern: str) -> list[bool]:
        """Per unit: whether its name, or its on-disk per-expert key, matches the fnmatch pattern."""
        spec = arch_of_family(self.arch)
        return [fnmatch.fnmatchcase(u.name, pattern) or fnmatch.fnmatchcase(disk_key(u, spec) or "", pattern)
                for u in self.units]


def model_identity(model: nn.Module) -> str:
    """A hash of parameter names and shapes (tied parameters once)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


CONTENT_SAMPLE = 4096  # values hashed per tensor
CONTENT_CHUNK = 1 << 20  # values summed at a time (float64, numpy's pairwise sum: the same on any thread count)


def content_identity(model: nn.Module) -> str:
    """A hash of the architecture and of each parameter's values: a strided
    sample of CONTENT_SAMPLE values plus the float64 sum and sum of squares of
    the whole tensor, so that any checkpoint with other weights (a fine-tune,
    another quantization) gets another identity without hashing every byte."""
    return content_identity_of(model_identity(model), sorted(model.named_parameters(), key=lambda kv: kv[0]))


def content_identity_of(architecture: str, named_tensors) -> str:
    """``content_identity`` from the architecture's identity and the
    (name, tensor) pairs in name order; a streamed source passes them one
    at a time. The sums are taken chunk by chunk in float64 and the chunks'
    sums added exactly (``math.fsum``): the same identity on any number of
    threads (torch's own reductions split by thread), and a float64 copy of
    one chunk, not of a whole embedding."""
    h = hashlib.sha256(("content-v2|" + architecture).encode())
    with torch.no_grad():
        for name, p in named_tensors:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // CONTENT_SAMPLE)
            sample = flat[::step][:CONTENT_SAMPLE].float().contiguous()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
            h.update(f"{stable_sum(flat):.17g},{stable_sum(flat, squared=True):.17g};".encode())
    return h.hexdigest()[:16]


def stable_sum(t: torch.Tensor, *, squared: bool = False) -> float:
    """The sum of ``t``'s values (or of their squares) in float64, the same
    on any number of threads (torch's reductions split the work by thread,
    which changes the last bits): numpy's pairwise sum over fixed chunks of
    CONTENT_CHUNK values, the chunks' sums added exactly; one chunk is
    copied to float64 at a time."""
    flat, parts = t.detach().reshape(-1), []
    for at in range(0, flat.numel(), CONTENT_CHUNK):
        chunk = flat[at:at + CONTENT_CHUNK].double().numpy()
        parts.append(float(np.sum(chunk * chunk if squared else chunk)))
    return math.fsum(parts)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _excluded(name: str, spec: ArchSpec) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in spec.exclude)


def _embedding_params(model: nn.Module) -> set[int]:
    """The token embeddings' parameters (by identity: a skeleton on the meta device has no storage to compare)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def embedding_units(model: nn.Module) -> list[Unit]:
    """The token embedding and the output matrix as units, (out, in) =
    (vocab, hidden), a row per token as GGUF stores them. A tied pair is one
    unit named after the output head (its input Gram matrix is the head's);
    an untied embedding is a ``lookup`` unit, the untied head a linear."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    emb_param = f"{names[id(emb)]}.weight"
    shape = (int(emb.weight.shape[0]), int(emb.weight.shape[1]))
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        return [Unit(names[id(head)], emb_param, shape)]
    units = [Unit(names[id(emb)], emb_param, shape, lookup=True)]
    if isinstance(head, nn.Linear):
        units.append(Unit(names[id(head)], f"{names[id(head)]}.weight", tuple(head.weight.shape)))
    return units


def find_units(model: nn.Module, *, embeddings: bool = False, content_id: str | None = None) -> Inventory:
    """Walk ``named_modules``; use the architecture table for ties, experts,
    exclusions and a check that expected projections were found. With
    ``embeddings``, the token embedding and output matrix are units too.
    ``content_id``: the weights' identity where the model holds none (a
    skeleton on the meta device, its weights streamed from disk)."""
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
    spec = arch_for(model_type)
    notices: list[str] = []
    if spec is None:
        notices.append(
            f"Architecture {model_type!r} is not in bitalloc's table; using the generic walk over "
            "nn.Linear/Conv1D modules (no tie groups, no fused experts)."
        )
        spec = GENERIC
    embed_params = _embedding_params(model)
    units: list[Unit] = []
    for mname, module in model.named_modules():
        if _is_linear(module) and not _excluded(mname, spec):
            if id(module.weight) in embed_params:
                continue  # a head tied to the embedding is kept with it
            transposed = isinstance(module, Conv1D)
            rows, cols = module.weight.shape
            shape = (cols, rows) if transposed else (rows, cols)
            units.append(Unit(mname, f"{mname}.weight", shape, None, transposed))
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.dim() == 3 and (any(full.endswith(s) for s in spec.expert_params) or mname.endswith("experts")):
                units += expert_units(full, tuple(p.shape))
    _check_projections(units, spec, notices)
    found: list[Unit] = []
    if embeddings:
        found = embedding_units(model)
        if not found:
            notices.append("No token embedding (nn.Embedding) was found; the embedding stays kept.")
        taken = {u.param for u in units}
        # the embedding first, an untied head last: the order of a forward pass
        units = [u for u in found[:1] if u.param not in taken] + units + [u for u in found[1:] if u.param not in taken]
    unit_params = {u.param for u in units}
    kept = tuple(KeptTensor(n, p.numel()) for n, p in model.named_parameters() if n not in unit_params)
    return Inventory(
        units=tuple(units),
        kept=kept,
        tie_groups=_tie_groups(units, spec),
        arch=spec.family,
        model_type=model_type,
        identity=model_identity(model),
        notices=tuple(notices),
        more_bits=_more_bits(units, spec),
        content_id=content_id or content_identity(model),
        embedding_units=tuple(u.name for u in found if u in units),
    )


def expert_units(param: str, shape: tuple[int, int, int]) -> list[Unit]:
    """The units of a fused (E, out, in) expert parameter: a slice per expert,
    or the two halves of each slice for a fused gate_up_proj."""
    E, out, cols = shape
    halves = FUSED_HALVES.get(param.rsplit(".", 1)[1]) if out % 2 == 0 else None
    if not halves:
        return [Unit(f"{param}[{e}]", param, (out, cols), e) for e in range(E)]
    half = out // 2
    return [Unit(f"{param}[{e}].{h}", param, (half, cols), e, rows=(k * half, (k + 1) * half))
            for e in range(E) for k, h in enumerate(halves)]


def disk_key(unit: Unit, spec: ArchSpec) -> str | None:
    """``model.layers.3.mlp.experts.gate_up_proj[7].gate`` -> ``model.layers.3.mlp.experts.7.gate_proj.weight``
    (Mixtral: ``model.layers.3.block_sparse_moe.experts.7.w1.weight``); None for a unit that is no expert slice."""
    layer = re.match(r"(.*?\.\d+\.)", unit.param)
    if unit.part is None or layer is None or unit.part not in spec.expert_keys:
        return None
    return layer.group(1) + spec.expert_keys[unit.part].format(e=unit.index)


def layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class BlockGroups:
    """Units grouped by the numbered block they live in (``<stack>.<i>.<rest>``,
    e.g. ``model.layers.3.mlp.up_proj``): what sequential GPTQ, the per-layer
    quantize pass and the calibration probes walk."""

    by_block: dict[int, list[Unit]]
    outside: list[Unit]  # units in no numbered block (token embedding, lm_head)
    stacks: frozenset[str]  # the numbered stacks' module names, e.g. {"model.layers"}

    @property
    def stack(self) -> str | None:
        """The one stack's name; None when there are none or several."""
        return next(iter(self.stacks)) if len(self.stacks) == 1 else None

    def block_name(self, index: int) -> str:
        """Module name of block ``index`` of the one stack."""
        return f"{self.stack}.{index}"


def group_by_block(units) -> BlockGroups:
    by_block: dict[int, list[Unit]] = {}
    outside: list[Unit] = []
    stacks: set[str] = set()
    for u in units:
        i = layer_index(u.name)
        if i is None:
            outside.append(u)
            continue
        stacks.add(u.name.split(f".{i}.")[0])
        by_block.setdefault(i, []).append(u)
    return BlockGroups(by_block, outside, frozenset(stacks))


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


def stop_forward(*_args) -> None:
    """A forward (pre-)hook that ends the pass at the module it is registered on."""
    raise StopForward


def llama_cpp_promotes(layer: int, n_layers: int) -> bool:
    """Q4_K_M's choice of layers for more bits: the first and last eighth of
    the layers and every third layer in between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _more_bits(units: list[Unit], spec: ArchSpec) -> tuple[str, ...]:
    layers = [i for i in (layer_index(u.name) for u in units) if i is not None]
    if not layers:
        return ()
    n_layers = max(layers) + 1
    return tuple(
        u.name for u in units
        if any(u.name.split("[")[0].endswith("." + s) for s in spec.more_bits)
        and (i := layer_index(u.name)) is not None and llama_cpp_promotes(i, n_layers)
    )


def _check_projections(units: list[Unit], spec: ArchSpec, notices: list[str]) -> None:
    names = [u.name for u in units]
    for suffix in spec.projections:
        if not any(n.endswith("." + suffix) for n in names):
            notices.append(f"Expected projection '{suffix}' of family {spec.family!r} was not found.")


EXPERT_TIE = "experts"  # every expert slice of one fused projection in one option (llama.cpp, vLLM)


def _tie_groups(units: list[Unit], spec: ArchSpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Named tie groups: the family's (qkv, gate_up, ...) per block, and
    ``experts``: the slices of each fused 3-D expert parameter (``--tie
    experts`` is the per-layer mode; without it each expert is its own unit)."""
    groups: dict[tuple[str, str], list[str]] = {}  # (block prefix, tie name) -> unit names
    for u in units:
        if u.index is not None:  # one group per fused parameter, and per half of a gate_up_proj
            groups.setdefault((f"{u.param}.{u.part}", EXPERT_TIE), []).append(u.name)
            continue
        for tie, suffixes in spec.tie_groups.items():
            for s in suffixes:
                if u.name.endswith("." + s):
                    groups.setdefault((u.name[: -len(s)], tie), []).append(u.name)
    return tuple((tie, tuple(g)) for (_, tie), g in groups.items() if len(g) > 1)


def unit_view(tensor: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The unit's part of its parameter (or of a tensor shaped like it, e.g. its gradient), as stored."""
    if unit.index is not None:
        tensor = tensor[unit.index]
    return tensor[unit.rows[0]:unit.rows[1]] if unit.rows else tensor


def get_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight as a float32 (out, in) tensor (a copy)."""
    W = unit_view(model.get_parameter(unit.param).detach(), unit)
    if unit.transposed:
        W = W.t()
    return W.float().clone()


def set_weight(model: nn.Module, unit: Unit, W: torch.Tensor) -> None:
    """Write an (out, in) weight back into the model, in place."""
    p = model.get_parameter(unit.param)
    with torch.no_grad():
        unit_view(p, unit).copy_((W.t() if unit.transposed else W).to(p.dtype))


def check_finite(W: torch.Tensor, unit: Unit) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise BadWeightsError(
            f"Tensor {unit.param} holds {bad} NaN/Inf values; bitalloc cannot quantize it. "
            "Check the checkpoint (a failed conversion or a corrupted download)."
        )
