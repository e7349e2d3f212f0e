"""Baselines a user would pick instead of an allocation: one option
everywhere (uniform), and llama.cpp's Q4_K_M rule. Each is the largest such
assignment within the budget."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bitalloc.calib.grams import importance_record
from bitalloc.errors import BitallocError
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import Inventory
from bitalloc.plan import Plan
from bitalloc.solve.problem import Constraints, budget_bits, cost_matrix, sizes_of
from bitalloc.table import ErrorTable


def _baseline_plan(inventory: Inventory, assignments: list[dict[str, QuantOption]], names: list[str],
                   settings, model_label: str, table: ErrorTable | None, kind: str) -> Plan:
    """The largest candidate assignment within the budget; ties by table error."""
    cap = budget_bits(settings.budget, inventory, keep_bits=settings.keep_bits)
    sizes = []
    for a in assignments:
        try:
            sizes.append(sizes_of(inventory, a, keep_bits=settings.keep_bits, allow_ragged=settings.menu.allow_ragged).quantized_bits)
        except BitallocError:
            sizes.append(np.iinfo(np.int64).max)
    ok = [i for i, s in enumerate(sizes) if s <= cap]
    if not ok:
        raise BitallocError(f"No {kind} assignment of the menu fits {settings.budget.describe()}; it needs a larger budget.")
    best = max(sizes[i] for i in ok)
    candidates = [i for i in ok if sizes[i] == best]

    def objective(i: int) -> float | None:
        if table is None:
            return None
        col = {o: j for j, o in enumerate(table.options)}
        return float(sum(table.errors[k, col[assignments[i][u.name]]] for k, u in enumerate(inventory.units)))

    if table is not None:
        candidates.sort(key=objective)
    i = candidates[0]
    return Plan(assignments[i], inventory.identity, model_label, settings.budget, f"{kind}:{names[i]}", kind,
                objective(i), settings.keep_bits, settings.menu.allow_ragged, Constraints(),
                quantizer=settings.quantizer, act_order=settings.act_order, sequential=settings.sequential,
                model_content=inventory.content_id, provenance=importance_record(settings))


def uniform_plan(inventory: Inventory, options: Sequence[QuantOption], settings, model_label: str,
                 table: ErrorTable | None = None) -> Plan:
    """The single option with the largest size not above the budget; among
    options of equal size, the one with the least total error in ``table``."""
    fitting = [o for o in options if (cost_matrix(inventory, [o], allow_ragged=settings.menu.allow_ragged) >= 0).all()]
    return _baseline_plan(inventory, [{u.name: o for u in inventory.units} for o in fitting],
                          [o.name for o in fitting], settings, model_label, table, "uniform")


def llama_rule_plan(inventory: Inventory, options: Sequence[QuantOption], settings, model_label: str,
                    table: ErrorTable | None = None) -> Plan:
    """llama.cpp's Q4_K_M rule at this budget: the units the rule promotes
    (attn_v, ffn_down in the first and last eighth of layers and every third
    layer between) get the option two bits up (same group and scheme, the
    next size in the menu if that is missing), the rest a base option; the
    largest such mix within the budget."""
    promoted = set(inventory.more_bits)
    if not promoted:
        raise BitallocError(f"The llama.cpp rule has no promoted tensors for family {inventory.arch!r}.")
    assignments, names = [], []
    for base in options:
        ups = [o for o in options if o.group_size == base.group_size and o.symmetric == base.symmetric
               and o.bits >= base.bits + 2]
        up = min(ups, key=lambda o: o.bits) if ups else base
        assignments.append({u.name: up if u.name in promoted else base for u in inventory.units})
        names.append(f"{base.name}+{up.bits}b")
    return _baseline_plan(inventory, assignments, names, settings, model_label, table, "llama-rule")


def structural_moe_units(inventory: Inventory) -> set[str]:
    """QuantMoE-Bench's structural prior: the shared experts, and every unit
    of the first and last layers that hold experts."""
    from bitalloc.model.units import layer_index

    moe_layers = sorted({layer_index(u.name) for u in inventory.units if u.index is not None} - {None})
    if not moe_layers:
        return set()
    ends = {moe_layers[0], moe_layers[-1]}
    return {u.name for u in inventory.units if "shared_expert" in u.name or layer_index(u.name) in ends}


def moe_rule_plan(inventory: Inventory, options: Sequence[QuantOption], settings, model_label: str,
                  table: ErrorTable | None = None) -> Plan:
    """The structural MoE baseline at this budget: the units of
    ``structural_moe_units`` one bit up (same group and scheme), the rest a
    base option; the largest such mix within the budget."""
    promoted = structural_moe_units(inventory)
    if not promoted:
        raise BitallocError("The structural MoE rule needs a model with experts; this one has none.")
    assignments, names = [], []
    for base in options:
        ups = [o for o in options if o.group_size == base.group_size and o.symmetric == base.symmetric
               and o.bits >= base.bits + 1 and not o.mixed]
        up = min(ups, key=lambda o: o.bits) if ups else base
        assignments.append({u.name: up if u.name in promoted else base for u in inventory.units})
        names.append(f"{base.name}+{up.bits}b")
    return _baseline_plan(inventory, assignments, names, settings, model_label, table, "moe-rule")
