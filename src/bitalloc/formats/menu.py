"""The option menu of a plan: which options (formats) a unit may take.

Two families: integer affine options (``int4-g64-sym``, the same for every
unit) and llama.cpp's GGUF types (``--format gguf``), whose block length
decides per unit which of them fit (a type that does not fit a unit's rows
simply has no cost for it, and the solver never picks it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from bitalloc.errors import BitallocError
from bitalloc.formats import fits, parse_option
from bitalloc.formats.affine import DEFAULT_BITS, DEFAULT_GROUP_SIZES, QuantOption, build_menu, group_count
from bitalloc.model.units import Inventory


@dataclass(frozen=True)
class MenuSettings:
    """The options a unit may take. ``group_sizes=None`` means automatic: the
    standard sizes (32, 64, 128, per-channel) that divide every unit."""

    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int, ...] | None = None
    schemes: tuple[str, ...] = ("asym", "sym")
    allow_ragged: bool = False
    fine: bool = False  # automatic group sizes: every multiple of 16 in [32, 512] dividing every unit
    format: str = "int"  # "int": integer affine options; "gguf": llama.cpp's types
    types: tuple[str, ...] | None = None  # GGUF types offered (None: every type the installed ggml has)
    embeddings: bool = False  # the token embedding and output matrix are units too (default with gguf)
    keep_type: str | None = None  # pin those units to this option instead of planning them
    imatrix: bool = True  # gguf: quantize with llama.cpp's importance matrix from the calibration text

    def __post_init__(self) -> None:
        if self.format not in MENU_FORMATS:
            raise BitallocError(f"The menu 'format' must be one of {list(MENU_FORMATS)}. Got {self.format!r} instead.")
        if self.format != "gguf" and self.types is not None:
            raise BitallocError("GGUF types (--types) are a menu of --format gguf; add --format gguf.")
        if self.keep_type is not None and not self.embeddings:
            raise BitallocError("--keep-type pins the embedding and output units; they are units only with "
                                "--embeddings (the default of --format gguf).")

    @property
    def gguf(self) -> bool:
        """Whether the menu is llama.cpp's GGUF types (else integer affine options)."""
        return self.format == "gguf"

    def to_dict(self) -> dict:
        return asdict(self)


MENU_FORMATS = ("int", "gguf")


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
    groups = menu.group_sizes
    if groups is None and menu.fine:
        groups = fine_group_sizes(inventory)
    elif groups is None:
        cols = {u.shape[1] for u in inventory.units}
        groups = tuple(g for g in DEFAULT_GROUP_SIZES if g == 0 or all(c % g == 0 for c in cols))
        dropped = sorted(set(DEFAULT_GROUP_SIZES) - set(groups))
        if dropped:
            notices.append(f"Group sizes {dropped} do not divide every unit's input size {sorted(cols)}; the menu uses {['channel' if g == 0 else g for g in groups]}.")
    elif not menu.allow_ragged:
        for u in inventory.units:
            for g in groups:
                group_count(u.shape[1], QuantOption(menu.bits[0], g), name=u.param)  # raises GroupSizeError
    return build_menu(menu.bits, groups, menu.schemes), notices


FINE_GROUPS = tuple(range(32, 513, 16))  # candidate group sizes of --fine-groups


def fine_group_sizes(inventory: Inventory) -> tuple[int, ...]:
    """Every multiple of 16 from 32 to 512 that divides every unit's input
    size, plus per-channel: more sizes between the standard ones (SmolLM2:
    32, 48, 64, 96, 192)."""
    cols = {u.shape[1] for u in inventory.units}
    return tuple(g for g in FINE_GROUPS if all(c % g == 0 for c in cols)) + (0,)
