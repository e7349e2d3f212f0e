"""The plan: unit FQN -> option, a versioned JSON file a person can read and
edit. It records the model's identity so that it is refused for another
model, and the sizes it realises in both bpw measures."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitalloc.errors import BitallocError, PlanMismatchError
from bitalloc.fileio import read_json, write_json
from bitalloc.options import QuantOption
from bitalloc.problem import Budget, Constraints, Sizes, sizes_of
from bitalloc.units import Inventory

PLAN_FORMAT = "bitalloc.plan"
PLAN_VERSION = 1
QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class Plan:
    assignment: dict[str, QuantOption]  # unit name -> option
    model_identity: str
    model_label: str
    budget: Budget
    scorer: str
    solver: str
    objective: float | None = None
    keep_bits: int = 16
    allow_ragged: bool = False
    constraints: Constraints = field(default_factory=Constraints)
    quantizer: str = "rtn"  # "rtn" or "gptq"
    act_order: bool = False  # GPTQ only
    sequential: bool = False  # GPTQ only: each layer's Hessians after earlier layers are quantized
    column_bits: dict[str, tuple[int, ...]] = field(default_factory=dict)  # units with a mixed option

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise BitallocError(f"The 'quantizer' parameter must be one of {list(QUANTIZERS)}. Got {self.quantizer!r} instead.")

    def sizes(self, inventory: Inventory) -> Sizes:
        return sizes_of(inventory, self.assignment, keep_bits=self.keep_bits, allow_ragged=self.allow_ragged)

    def check_model(self, inventory: Inventory) -> None:
        """Refuse a plan made for another model, or one that misses units."""
        if self.model_identity != inventory.identity:
            raise PlanMismatchError(
                f"This plan was made for another model (identity {self.model_identity}, {self.model_label}); "
                f"the loaded model's identity is {inventory.identity}. Make a plan for this model with `bitalloc plan`."
            )
        names = {u.name for u in inventory.units}
        missing, extra = names - set(self.assignment), set(self.assignment) - names
        if missing or extra:
            raise PlanMismatchError(
                f"The plan's units do not match the model's: {len(missing)} missing (e.g. {sorted(missing)[:1]}), "
                f"{len(extra)} unknown (e.g. {sorted(extra)[:1]}). Regenerate the plan."
            )

    def to_dict(self, inventory: Inventory | None = None) -> dict:
        units = {name: opt.name for name, opt in self.assignment.items()}
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"identity": self.model_identity, "label": self.model_label},
            "budget": self.budget.to_dict(),
            "scorer": self.scorer,
            "solver": self.solver,
            "quantizer": self.quantizer,
            "act_order": self.act_order,
            "sequential": self.sequential,
            "objective": self.objective,
            "keep_bits": self.keep_bits,
            "allow_ragged_groups": self.allow_ragged,
            "constraints": self.constraints.to_dict(),
        }
        if inventory is not None:
            data["sizes"] = self.sizes(inventory).to_dict()
            data["sizes"]["note"] = (
                "quantized_bpw: stored bits (codes + fp16 scales + fp16 zeros) of the quantized units / their "
                "weights; code_bpw: codes only; model_bpw: whole model with kept tensors at keep_bits, tied once"
            )
        data["units"] = units
        if self.column_bits:
            data["column_bits"] = {name: list(bits) for name, bits in self.column_bits.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise BitallocError("This file is not a bitalloc plan (missing 'format': 'bitalloc.plan').")
        if data.get("version") != PLAN_VERSION:
            raise BitallocError(f"Plan version {data.get('version')} is not supported (expected {PLAN_VERSION}).")
        try:
            assignment = {name: QuantOption.parse(opt) for name, opt in data["units"].items()}
        except KeyError as e:
            raise BitallocError(f"The plan lacks the field {e}.") from None
        return cls(
            assignment=assignment,
            model_identity=data["model"]["identity"],
            model_label=data["model"].get("label", "?"),
            budget=Budget.from_dict(data["budget"]),
            scorer=data.get("scorer", "?"),
            solver=data.get("solver", "?"),
            objective=data.get("objective"),
            keep_bits=int(data.get("keep_bits", 16)),
            allow_ragged=bool(data.get("allow_ragged_groups", False)),
            constraints=Constraints.from_dict(data.get("constraints", {})),
            quantizer=data.get("quantizer", "rtn"),
            act_order=bool(data.get("act_order", False)),
            sequential=bool(data.get("sequential", False)),
            column_bits={name: tuple(b) for name, b in data.get("column_bits", {}).items()},
        )

    def save(self, path: str, inventory: Inventory | None = None) -> None:
        write_json(path, self.to_dict(inventory))

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            return cls.from_dict(read_json(path))
        except FileNotFoundError:
            raise BitallocError(f"Plan file {path!r} does not exist. Make one with `bitalloc plan --out {path}`.") from None
        except ValueError as e:
            raise BitallocError(f"Plan file {path!r} is not valid JSON: {e}.") from None
