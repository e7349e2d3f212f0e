"""Error tables: for every unit and option, importance x distortion.

A scorer supplies both halves. The measurement (distortion) is the expensive
part and is shared: ``rtn-mse`` and ``rtn-mse-rel`` measure the same
round-to-nearest weight error ||W - Q(W)||^2 and differ only in importance
(1, or 1/||W||^2). Tables are versioned JSON files, reusable for any budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from bitalloc.errors import BitallocError, GroupSizeError, PlanMismatchError
from bitalloc.fileio import read_json, write_json
from bitalloc.options import QuantOption, group_count
from bitalloc.quant import fake_quantize
from bitalloc.units import Inventory, Unit, check_finite, get_weight

TABLE_FORMAT = "bitalloc.error-table"
TABLE_VERSION = 1


@dataclass(frozen=True)
class ErrorTable:
    """distortion[u, o] (NaN: option not applicable to unit u) and importance[u]."""

    scorer: str
    model_identity: str
    unit_names: tuple[str, ...]
    options: tuple[QuantOption, ...]
    distortion: np.ndarray  # (units, options) float64
    importance: np.ndarray  # (units,) float64
    weight_norm2: np.ndarray | None = None  # (units,) ||W||^2, lets one measurement serve other scorers

    def __post_init__(self) -> None:
        shape = (len(self.unit_names), len(self.options))
        if self.distortion.shape != shape or self.importance.shape != (shape[0],):
            raise BitallocError(
                f"Error table shapes disagree: distortion {self.distortion.shape}, importance "
                f"{self.importance.shape}, expected {shape}."
            )

    @property
    def errors(self) -> np.ndarray:
        """(units, options): the quantity the solver minimises the sum of."""
        return self.importance[:, None] * self.distortion

    def with_importance(self, scorer: str, importance: np.ndarray) -> "ErrorTable":
        return ErrorTable(scorer, self.model_identity, self.unit_names, self.options, self.distortion, importance,
                          self.weight_norm2)

    def rescored(self, scorer: str) -> "ErrorTable":
        """The same RTN measurement under another weight-error scorer."""
        check_scorer(scorer)
        if self.weight_norm2 is None or self.scorer not in SCORERS:
            raise BitallocError(f"A table made by {self.scorer!r} cannot serve scorer {scorer!r}; score again.")
        return self.with_importance(scorer, SCORERS[scorer][1](self.weight_norm2))

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "scorer": self.scorer,
            "model_identity": self.model_identity,
            "options": [o.name for o in self.options],
            "units": {
                name: {
                    "importance": float(self.importance[i]),
                    **({} if self.weight_norm2 is None else {"weight_norm2": float(self.weight_norm2[i])}),
                    "distortion": [None if np.isnan(d) else float(d) for d in self.distortion[i]],
                }
                for i, name in enumerate(self.unit_names)
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ErrorTable":
        if data.get("format") != TABLE_FORMAT:
            raise BitallocError("This file is not a bitalloc error table (missing 'format': 'bitalloc.error-table').")
        if data.get("version") != TABLE_VERSION:
            raise BitallocError(f"Error table version {data.get('version')} is not supported (expected {TABLE_VERSION}).")
        names = tuple(data["units"])
        rows = [data["units"][n] for n in names]
        return cls(
            scorer=data["scorer"],
            model_identity=data["model_identity"],
            unit_names=names,
            options=tuple(QuantOption.parse(o) for o in data["options"]),
            distortion=np.array([[np.nan if d is None else d for d in r["distortion"]] for r in rows], dtype=np.float64),
            importance=np.array([r["importance"] for r in rows], dtype=np.float64),
            weight_norm2=np.array([r["weight_norm2"] for r in rows]) if rows and "weight_norm2" in rows[0] else None,
        )

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "ErrorTable":
        return cls.from_dict(read_json(path))

    def check_model(self, inventory: Inventory) -> None:
        if self.model_identity != inventory.identity:
            raise PlanMismatchError(
                f"The error table was measured on another model (identity {self.model_identity}, this model "
                f"{inventory.identity}). Score this model again, without --table."
            )


def rtn_weight_errors(W: torch.Tensor, options: Sequence[QuantOption], *, allow_ragged: bool, name: str) -> np.ndarray:
    """||W - RTN(W)||^2 for each option; NaN where the group size does not fit."""
    out = np.full(len(options), np.nan)
    for j, opt in enumerate(options):
        try:
            group_count(W.shape[1], opt, allow_ragged=allow_ragged, name=name)
        except GroupSizeError:
            continue
        out[j] = float(((W - fake_quantize(W, opt, allow_ragged=allow_ragged)) ** 2).sum(dtype=torch.float64))
    return out


def measure_rtn(
    model,
    inventory: Inventory,
    options: Sequence[QuantOption],
    *,
    allow_ragged: bool = False,
    progress: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(distortion (units, options), ||W||^2 (units,)) for every unit."""
    units: Sequence[Unit] = inventory.units
    distortion = np.empty((len(units), len(options)))
    norms = np.empty(len(units))
    iterator = progress(units, desc="scoring (RTN error)", unit="tensor") if progress else units
    for i, unit in enumerate(iterator):
        W = get_weight(model, unit)  # (out, in)
        check_finite(W, unit)
        distortion[i] = rtn_weight_errors(W, options, allow_ragged=allow_ragged, name=unit.param)
        norms[i] = float((W.double() ** 2).sum())
    return distortion, norms


def _importance_one(norms: np.ndarray) -> np.ndarray:
    return np.ones_like(norms)


def _importance_relative(norms: np.ndarray) -> np.ndarray:
    return 1.0 / np.maximum(norms, np.finfo(np.float64).tiny)


# scorer name -> (what it minimises, importance from ||W||^2)
SCORERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "rtn-mse": ("sum of squared RTN weight error ||W - Q(W)||^2", _importance_one),
    "rtn-mse-rel": ("sum of relative RTN weight error ||W - Q(W)||^2 / ||W||^2", _importance_relative),
}


def check_scorer(name: str) -> None:
    if name not in SCORERS:
        raise BitallocError(f"The 'scorer' parameter must be one of {sorted(SCORERS)}. Got {name!r} instead.")


def score(
    model,
    inventory: Inventory,
    options: Sequence[QuantOption],
    scorers: Sequence[str] = ("rtn-mse",),
    *,
    allow_ragged: bool = False,
    progress: Callable | None = None,
) -> dict[str, ErrorTable]:
    """One RTN measurement, one error table per requested scorer."""
    for s in scorers:
        check_scorer(s)
    distortion, norms = measure_rtn(model, inventory, options, allow_ragged=allow_ragged, progress=progress)
    names = tuple(u.name for u in inventory.units)
    return {
        s: ErrorTable(s, inventory.identity, names, tuple(options), distortion, SCORERS[s][1](norms), norms)
        for s in scorers
    }
