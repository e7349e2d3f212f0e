"""Error tables: for every unit and option, importance x distortion.

The solver minimises the sum over units of ``importance[u] * distortion[u, o]``.
Tables are versioned JSON files keyed by unit name, reusable for any budget.
Scorers (``scorers/``) fill them; the solver (``solve/``) reads them: the file is the contract
between the two, as the plan file is between the solver and the quantizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bitalloc.errors import BitallocError, PlanMismatchError
from bitalloc.fileio import read_json, write_json
from bitalloc.formats import parse_option
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import Inventory
from bitalloc.schema import check_header, need, number_list

TABLE_FORMAT = "bitalloc.error-table"
TABLE_VERSION = 3  # 2: model_identity is the content hash; 3: that hash the same on any thread count


@dataclass(frozen=True)
class ErrorTable:
    """distortion[u, o] (NaN: option not applicable to unit u) and importance[u]."""

    scorer: str
    model_identity: str  # Inventory.content_id of the checkpoint measured
    unit_names: tuple[str, ...]
    options: tuple[QuantOption, ...]
    distortion: np.ndarray  # (units, options) float64
    importance: np.ndarray  # (units,) float64
    weight_norm2: np.ndarray | None = None  # (units,) ||W||^2, lets one measurement serve other scorers
    # unit -> mixed option name -> bit-width per column group (mixed options only)
    column_bits: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)

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
                          self.weight_norm2, self.column_bits)

    def rescored(self, scorer: str) -> "ErrorTable":
        """The same plain RTN measurement as rtn-mse or rtn-mse-rel."""
        if scorer not in WEIGHT_ERROR_IMPORTANCE or self.scorer not in WEIGHT_ERROR_IMPORTANCE or self.weight_norm2 is None:
            raise BitallocError(f"A table made by {self.scorer!r} cannot serve scorer {scorer!r}; score again without --table.")
        return self.with_importance(scorer, WEIGHT_ERROR_IMPORTANCE[scorer](self.weight_norm2))

    def sensitivity(self, option: QuantOption) -> np.ndarray:
        """(units,) the table's predicted cost of storing each unit at ``option``."""
        return self.errors[:, self.options.index(option)]

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
                    **({"column_bits": {o: list(b) for o, b in self.column_bits[name].items()}}
                       if name in self.column_bits else {}),
                    "distortion": [None if np.isnan(d) else float(d) for d in self.distortion[i]],
                }
                for i, name in enumerate(self.unit_names)
            },
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "The error table") -> "ErrorTable":
        data = check_header(data, TABLE_FORMAT, TABLE_VERSION, where, "error table")
        option_names = need(data, "options", "list", where)
        if not option_names or not all(isinstance(o, str) for o in option_names):
            raise BitallocError(f"{where}: 'options' must be a non-empty list of option names.")
        options = tuple(parse_option(o) for o in option_names)
        units = need(data, "units", "object", where)
        if not units:
            raise BitallocError(f"{where} scores no unit ('units' is empty).")
        names = tuple(units)
        rows = [need(units, n, "object", f"{where}: units") for n in names]
        for n, r in zip(names, rows):
            at = f"{where}: unit {n!r}"
            need(r, "importance", "number", at)
            number_list(need(r, "distortion", "list", at), at, "distortion", length=len(options), nullable=True)
            if "weight_norm2" in r:
                need(r, "weight_norm2", "number", at)
        norms = all("weight_norm2" in r for r in rows)
        _check_truths(where, names, options, rows)
        return cls(
            scorer=need(data, "scorer", "string", where),
            model_identity=need(data, "model_identity", "string", where),
            unit_names=names,
            options=options,
            distortion=np.array([[np.nan if d is None else d for d in r["distortion"]] for r in rows], dtype=np.float64),
            importance=np.array([r["importance"] for r in rows], dtype=np.float64),
            weight_norm2=np.array([r["weight_norm2"] for r in rows]) if norms else None,
            column_bits={n: {o: tuple(b) for o, b in r["column_bits"].items()} for n, r in zip(names, rows)
                         if isinstance(r.get("column_bits"), dict)},
        )

    def rising_units(self) -> list[str]:
        """Units whose distortion grows with bits somewhere within a format
        family (e.g. int4-g64-asym above int3-g64-asym): a measured table can
        show it (noise, a quantizer's search), but it is not what more bits do."""
        out = []
        families: dict[str, list[int]] = {}
        for j, o in enumerate(self.options):
            families.setdefault(o.family, []).append(j)
        for i, name in enumerate(self.unit_names):
            for cols in families.values():
                d = [self.distortion[i, j] for j in sorted(cols, key=lambda j: self.options[j].bits)]
                d = [x for x in d if np.isfinite(x)]
                if any(b > a * (1 + 1e-9) + 1e-300 for a, b in zip(d, d[1:])):
                    out.append(name)
                    break
        return out

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "ErrorTable":
        where = f"Error table {path!r}"
        try:
            return cls.from_dict(read_json(path, "error table"), where)
        except (TypeError, ValueError, KeyError) as e:
            raise BitallocError(f"{where} is damaged: {e}.") from None

    def check_model(self, inventory: Inventory) -> None:
        """Refuse a table measured on another checkpoint, even one of the same
        architecture (the identity is a hash of the weights' content)."""
        if self.model_identity != inventory.content_id:
            raise PlanMismatchError(
                f"The error table was measured on another model or checkpoint (content {self.model_identity}; this "
                f"model's is {inventory.content_id}). Score this model again, without --table."
            )
        if set(self.unit_names) != {u.name for u in inventory.units}:
            raise PlanMismatchError("The error table's units do not match this model's units. Score this model again, "
                                    "without --table.")




def _check_truths(where: str, names, options, rows: list[dict]) -> None:
    """What every error table obeys, whoever wrote it: each importance and
    distortion finite and at least 0 (a distortion of an option that does not
    fit is null); weight norms positive. A table that breaks one would steer
    the solver (a negative distortion looks like a gain) and is refused."""
    for n, r in zip(names, rows):
        at = f"{where}: unit {n!r}"
        imp = r["importance"]
        if not math.isfinite(imp) or imp < 0:
            raise BitallocError(f"{at} has importance {imp}; importances are finite and at least 0. The table was "
                                "edited or damaged: score again.")
        for o, d in zip(options, r["distortion"]):
            if d is not None and (not math.isfinite(d) or d < 0):
                raise BitallocError(f"{at} has distortion {d} at {o.name}; distortions are finite and at least 0 "
                                    "(null where the option does not fit). The table was edited or damaged: score "
                                    "again.")
        norm = r.get("weight_norm2")
        if norm is not None and (not math.isfinite(norm) or norm <= 0):
            raise BitallocError(f"{at} has weight_norm2 {norm}; a squared weight norm is finite and above 0.")


# rtn-mse and rtn-mse-rel share one measurement and differ only in importance.
WEIGHT_ERROR_IMPORTANCE = {
    "rtn-mse": lambda norms: np.ones_like(norms),
    "rtn-mse-rel": lambda norms: 1.0 / np.maximum(norms, np.finfo(np.float64).tiny),
}
