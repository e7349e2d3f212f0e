"""The option menu of a plan: which options (formats) a unit may take.

Three families: integer affine options (``int4-g64-sym``, the same for every
unit); the schemes vLLM serves from compressed-tensors checkpoints
(``--format vllm``: ``w4a16-g128-sym``, ``w8a16-pc-asym``, ..., with the
ties its fused projections need); and llama.cpp's GGUF types (``--format
gguf``), whose block length decides per unit which of them fit (a type that
does not fit a unit's rows simply has no cost for it, and the solver never
picks it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from bitalloc.errors import BitallocError
from bitalloc.formats import fits, parse_option
from bitalloc.formats.affine import DEFAULT_BITS, DEFAULT_GROUP_SIZES, QuantOption, build_menu, group_count
from bitalloc.model.units import EXPERT_TIE, Inventory


@dataclass(frozen=True)
class MenuSettings:
    """The options a unit may take. ``group_sizes=None`` means automatic: the
    standard sizes (32, 64, 128, per-channel) that divide every unit."""

    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int, ...] | None = None
    schemes: tuple[str, ...] = ("asym", "sym")
    allow_ragged: bool = False
    fine: bool = False  # automatic group sizes: every multiple of 16 in [32, 512] dividing every unit
    format: str = "int"  # "int": integer affine options; "vllm": compressed-tensors schemes; "gguf": llama.cpp's types
    types: tuple[str, ...] | None = None  # GGUF types offered (None: every type the installed ggml has)
    embeddings: bool = False  # the token embedding and output matrix are units too (default with gguf)
    keep_type: str | None = None  # pin those units to this option instead of planning them
    imatrix: bool = True  # gguf: quantize with llama.cpp's importance matrix from the calibration text

    def __post_init__(self) -> None:
        if self.format not in MENU_FORMATS:
            raise BitallocError(f"The menu 'format' must be one of {list(MENU_FORMATS)}. Got {self.format!r} instead.")
        if self.format != "gguf" and self.types is not None:
            raise BitallocError("GGUF types (--types) are a menu of --format gguf; add --format gguf.")
        if self.format == "vllm" and self.embeddings:
            raise BitallocError("vLLM serves the token embedding and the output matrix unquantized; drop --embeddings "
                                "with --format vllm (they are kept at --keep-bits).")
        if self.format == "vllm" and (self.fine or self.allow_ragged):
            raise BitallocError(f"{'--fine-groups' if self.fine else '--allow-ragged-groups'} has no place in "
                                "--format vllm: its kernels take groups of 32, 64 or 128 columns, or per channel.")
        if self.keep_type is not None and not self.embeddings:
            raise BitallocError("--keep-type pins the embedding and output units; they are units only with "
                                "--embeddings (the default of --format gguf).")

    @property
    def gguf(self) -> bool:
        """Whether the menu is llama.cpp's GGUF types (else integer affine options)."""
        return self.format == "gguf"

    def to_dict(self) -> dict:
        return asdict(self)


MENU_FORMATS = ("int", "vllm", "gguf")


def gguf_menu(types: Sequence[str] | None) -> tuple:
    """The GGUF types offered, cheapest first: those named (checked against
    the installed ggml) or every type it supports."""
    from bitalloc.formats.gguf_types import gguf_types, parse_gguf_type

    chosen = gguf_types() if types is None else tuple(dict.fromkeys(parse_gguf_type(t) for t in types))
    return tuple(sorted(chosen, key=lambda t: (t.bpw, t.name)))


def keep_type_rules(inventory: Inventory, menu: MenuSettings, options: Sequence) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """--allow rules pinning the embedding and output units to ``menu.keep_type``."""
    if menu.keep_type is None:
        return ()
    wanted = parse_option(menu.keep_type)
    if wanted not in options:
        raise BitallocError(f"--keep-type {menu.keep_type} is not in the menu ({', '.join(o.name for o in options)}).")
    return tuple((name, (wanted.name,)) for name in inventory.embedding_units)


def resolve_menu(inventory: Inventory, menu: MenuSettings) -> tuple[tuple[QuantOption, ...], list[str]]:
    """The option menu for this model, and notices about what was dropped."""
    notices = []
    if menu.gguf:
        options = gguf_menu(menu.types)
        unfit = [u.name for u in inventory.units if not any(fits(u.shape, o) for o in options)]
        if unfit:
            raise BitallocError(f"No GGUF type of the menu fits {len(unfit)} unit(s), e.g. {unfit[0]!r} with "
                                f"{inventory.unit(unfit[0]).shape[1]} input columns; add F16 or a 32-block type "
                                "(Q8_0, Q4_0) to --types.")
        return options, notices
    if menu.format == "vllm":
        return vllm_menu(inventory, menu)
    groups = menu.group_sizes
    if groups is None and menu.fine:
        groups = fine_group_sizes(inventory)
    elif groups is None or not menu.allow_ragged:
        groups = group_sizes_for(inventory, groups, DEFAULT_GROUP_SIZES, notices, "the menu")
    return build_menu(menu.bits, groups, menu.schemes), notices


def group_sizes_for(inventory: Inventory, given, standard: tuple[int, ...], notices: list[str], menu: str):
    """Group sizes named (each checked to divide every unit: GroupSizeError
    names the first that does not) or, with none named, those of ``standard``
    that divide every unit's input size (0, per channel, always), with a
    notice for those left out."""
    cols = sorted({u.shape[1] for u in inventory.units})
    if given is not None:
        for u in inventory.units:
            for g in given:
                group_count(u.shape[1], QuantOption(8, g), name=u.param)  # raises GroupSizeError
        return tuple(given)
    groups = tuple(g for g in standard if g == 0 or all(c % g == 0 for c in cols))
    dropped = sorted(set(standard) - set(groups))
    if dropped:
        notices.append(f"Group sizes {dropped} do not divide every unit's input size {cols}; {menu} uses "
                       f"{['channel' if g == 0 else g for g in groups]}.")
    return groups


FINE_GROUPS = tuple(range(32, 513, 16))  # candidate group sizes of --fine-groups


def fine_group_sizes(inventory: Inventory) -> tuple[int, ...]:
    """Every multiple of 16 from 32 to 512 that divides every unit's input
    size, plus per-channel: more sizes between the standard ones (SmolLM2:
    32, 48, 64, 96, 192)."""
    cols = {u.shape[1] for u in inventory.units}
    return tuple(g for g in FINE_GROUPS if all(c % g == 0 for c in cols)) + (0,)


def vllm_menu(inventory: Inventory, menu: MenuSettings) -> tuple[tuple, list[str]]:
    """The compressed-tensors schemes vLLM serves that fit every unit: 4 and 8
    bits (the default bit list means both), groups of 32/64/128 that divide
    every unit's columns, and per channel."""
    from bitalloc.formats.wna16 import WNA16_BITS, WNA16_GROUP_SIZES, wna16_menu

    bits = WNA16_BITS if tuple(menu.bits) == DEFAULT_BITS else tuple(menu.bits)
    if not set(bits) <= set(WNA16_BITS):
        raise BitallocError(f"--format vllm offers {list(WNA16_BITS)} bits (vLLM's W4A16 and W8A16 kernels); "
                            f"--bits {','.join(map(str, bits))} asks for {sorted(set(bits) - set(WNA16_BITS))}.")
    given = menu.group_sizes
    if given is not None and not set(given) <= set(WNA16_GROUP_SIZES):
        raise BitallocError(f"--format vllm takes group sizes {[g for g in WNA16_GROUP_SIZES if g]} or 0 (per "
                            f"channel); --group-sizes asks for {sorted(set(given) - set(WNA16_GROUP_SIZES))}.")
    notices: list[str] = []
    groups = group_sizes_for(inventory, given, WNA16_GROUP_SIZES, notices, "the vLLM menu")
    options = wna16_menu(bits, groups, menu.schemes)
    if "asym" in menu.schemes:
        notices.append("Asymmetric schemes store packed integer zero points, which vLLM reads; the transformers "
                       "5.24 / compressed-tensors 0.20.1 loader fails on them (size mismatch of weight_zero_point, "
                       "llm-compressor issue 1618), so their folders are checked by bitalloc's own loader only.")
    ties = runtime_ties(inventory)
    if ties:
        notices.append(f"vLLM runs {', '.join(ties)} as fused layers, each stored in one scheme: those units are "
                       "tied (each group takes one option).")
    return options, notices


EXPERTS_PATTERN = "*.experts.*"  # every routed expert: vLLM's fused MoE layer holds all of one layer's experts


def runtime_ties(inventory: Inventory) -> tuple[str, ...]:
    """The --tie entries vLLM needs: the family's fused projections (q/k/v,
    gate/up, ...) and all routed experts of one layer (a pattern, grouped per
    layer); ``experts`` (per fused parameter) is subsumed by the latter."""
    names = tuple(dict.fromkeys(tie for tie, _ in inventory.tie_groups if tie != EXPERT_TIE))
    has_experts = any(inventory.matching(EXPERTS_PATTERN))
    return names + ((EXPERTS_PATTERN,) if has_experts else ())
