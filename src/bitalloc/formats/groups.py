"""Column groups of an integer affine option: how many per output row.

The bottom of the affine family: the option type (``affine``) and its
round-to-nearest primitives (``affine_rtn``) both read it; it reads neither.
"""

from __future__ import annotations

import math

from bitalloc.errors import GroupSizeError


def group_count(cols: int, option, *, allow_ragged: bool = False, name: str = "") -> int:
    """Groups per output row. A group size that does not divide ``cols`` is an
    error unless ``allow_ragged`` (the last group is then shorter; its scale and
    zero are still counted in full)."""
    if option.group_size == 0 or option.group_size >= cols:
        if option.group_size > cols and not allow_ragged:
            raise GroupSizeError(
                f"Group size {option.group_size} is larger than the {cols} input columns of "
                f"{name or 'a tensor'}. Choose group sizes that divide {cols}, or pass "
                "--allow-ragged-groups to use one shorter group."
            )
        return 1
    if cols % option.group_size and not allow_ragged:
        raise GroupSizeError(
            f"Group size {option.group_size} does not divide the {cols} input columns of "
            f"{name or 'a tensor'}. Choose group sizes that divide {cols}, or pass "
            "--allow-ragged-groups to let the last group of each row be shorter (its scale "
            "and zero are counted in full)."
        )
    return math.ceil(cols / option.group_size)
