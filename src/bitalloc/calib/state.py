"""The calibration state of one model and calibration text, read by scorers
and quantizers alike: each unit's Gram matrix H (unreached experts filled
in), the routing statistics of MoE layers, and the gradients of the
calibration loss. Computed once per (weights, text, settings), cached on disk
by ``grams``; nothing here knows about scorers or plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bitalloc.calib.grams import CalibSettings, cached_calibration, calibration_windows
from bitalloc.model.units import Inventory, unit_view


@dataclass(frozen=True)
class CalibrationState:
    hessians: dict[str, torch.Tensor]  # unit -> H (in, in) = 2 X^T X / n; every non-lookup unit present
    routing: dict[str, dict]  # experts module -> tokens seen / routed / routing-weight mass
    notices: tuple[str, ...] = ()  # e.g. experts no calibration token reached


def calibration_state(model, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                      progress: Callable | None = None) -> CalibrationState:
    """H per unit and the routing statistics, from the disk cache or measured;
    an expert no calibration token reached gets the mean H of the reached
    experts of its projection (said in ``notices``)."""
    H, routing = cached_calibration(model, inventory, tokenizer, text, settings, progress=progress)
    filled, missing = fill_unreached_experts(H, [u for u in inventory.units if not u.lookup])
    notices = () if not missing else (
        f"{len(missing)} expert slice(s) received no calibration token (e.g. {missing[0]}); their calibrated "
        "tables and GPTQ use the mean Gram matrix of the reached experts of the same projection. More or "
        "other calibration text (--calib-text, --calib-windows) would reach them.",)
    return CalibrationState(filled, routing, notices)


def calibration_gradients(model, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                          progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Mean gradient of the calibration NLL w.r.t. each unit's (out, in)
    weight. Gradients are switched on for the units' parameters only while it
    runs, and every parameter is left without a gradient after."""
    windows = calibration_windows(tokenizer, text, settings)
    params = {u.param for u in inventory.units}
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
        p.grad = None
    try:
        rows = progress(list(windows), desc="gradients", unit="window") if progress else windows
        for row in rows:
            loss = model(row[None, :], labels=row[None, :]).loss / len(windows)
            loss.backward()
        out = {}
        for u in inventory.units:
            p = model.get_parameter(u.param)
            g = unit_view(p.grad, u)
            out[u.name] = (g.t() if u.transposed else g).detach().float().clone()
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
    return out


def fill_unreached_experts(H: dict[str, torch.Tensor], units) -> tuple[dict[str, torch.Tensor], list[str]]:
    """H with every unit present: an expert slice without one gets the mean of
    the reached slices of the same parameter (identity scaled to the mean
    diagonal of all of H if none of them was reached)."""
    missing = [u for u in units if u.name not in H]
    if not missing:
        return H, []
    out = dict(H)
    for u in missing:
        peers = [H[v.name] for v in units if (v.param, v.part) == (u.param, u.part) and v.name in H]
        if peers:
            out[u.name] = torch.stack(peers).mean(0)
        else:
            scale = float(torch.stack([h.diagonal().mean() for h in H.values()]).mean()) if H else 1.0
            out[u.name] = torch.eye(u.shape[1]) * scale
    return out, [u.name for u in missing]
