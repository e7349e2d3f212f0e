"""The option menu of a plan: which options (formats) a unit may take."""

from __future__ import annotations

from dataclasses import dataclass

from bitalloc.formats.affine import DEFAULT_BITS, DEFAULT_GROUP_SIZES, QuantOption, build_menu, group_count
from bitalloc.units import Inventory


@dataclass(frozen=True)
class MenuSettings:
    """The options a unit may take. ``group_sizes=None`` means automatic: the
    standard sizes (32, 64, 128, per-channel) that divide every unit."""

    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int, ...] | None = None
    schemes: tuple[str, ...] = ("asym", "sym")
    allow_ragged: bool = False
    fine: bool = False  # automatic group sizes: every multiple of 16 in [32, 512] dividing every unit


def resolve_menu(inventory: Inventory, menu: MenuSettings) -> tuple[tuple[QuantOption, ...], list[str]]:
    """The option menu for this model, and notices about what was dropped."""
    notices = []
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
