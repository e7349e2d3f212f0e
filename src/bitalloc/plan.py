"""The plan: unit FQN -> option, a versioned JSON file a person can read and
edit. It records the model's identity so that it is refused for another
model, and the sizes it realises in both bpw measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitalloc.errors import BitallocError, PlanMismatchError
from bitalloc.fileio import read_json, write_json
from bitalloc.formats import fits, parse_option
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import Inventory
from bitalloc.quantizers import QUANTIZERS
from bitalloc.schema import check_header, need, string_map
from bitalloc.solve.problem import Budget, Constraints, Sizes, sizes_of

PLAN_FORMAT = "bitalloc.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class ImportanceRecord:
    """The calibration a plan's importance matrix came from; quantize and
    export recompute the matrix from it."""

    calib: dict  # CalibSettings.to_dict(): windows, seq_len
    text: str  # the calibration text's path, or calib.grams.DEFAULT_CALIB_LABEL
    layout: str  # how windows are taken from the text (calib.grams.CALIB_LAYOUT)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ImportanceRecord":
        calib = need(data, "calib", "object", where)
        for key in ("windows", "seq_len"):
            need(calib, key, "int", f"{where}: calib")
        return cls(calib=dict(calib), text=need(data, "text", "string", where),
                   layout=need(data, "layout", "string", where, optional=True, default=""))


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's two measurements on calibration windows and what it kept."""

    objective: str
    allocated: dict  # the allocation's measurements (objective -> value)
    uniform: dict  # the uniform plan's of the same size
    kept: str  # "allocated" or "uniform"
    windows: int
    seq_len: int

    @property
    def replaced(self) -> bool:
        """Whether the guard returned the uniform plan instead of the allocation."""
        return self.kept == "uniform"

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "GuardVerdict":
        kept = need(data, "kept", "string", where)
        if kept not in ("allocated", "uniform"):
            raise BitallocError(f"{where}: 'kept' must be 'allocated' or 'uniform'; it holds {kept!r}.")
        return cls(objective=need(data, "objective", "string", where), allocated=need(data, "allocated", "object", where),
                   uniform=need(data, "uniform", "object", where), kept=kept,
                   windows=need(data, "windows", "int", where), seq_len=need(data, "seq_len", "int", where))


@dataclass(frozen=True)
class Provenance:
    """How a plan was made beyond its table: the importance matrix's
    calibration, refinement rounds, the guard's verdict, notices. Written as
    the plan file's ``provenance`` object; every field optional."""

    importance: ImportanceRecord | None = None
    refinement: dict | None = None  # RefineSettings.to_dict() + "rounds": [Round.to_dict()]
    guard: GuardVerdict | None = None
    notices: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out: dict = {}
        if self.importance is not None:
            out["importance"] = asdict(self.importance)
        if self.refinement is not None:
            out["refinement"] = self.refinement
        if self.guard is not None:
            out["guard"] = asdict(self.guard)
        if self.notices:
            out["notices"] = list(self.notices)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Provenance":
        where = f"{where}: provenance"
        importance = need(data, "importance", "object", where, optional=True)
        guard = need(data, "guard", "object", where, optional=True)
        notices = need(data, "notices", "list", where, optional=True, default=[])
        return cls(importance=None if importance is None else ImportanceRecord.from_dict(importance, f"{where}.importance"),
                   refinement=need(data, "refinement", "object", where, optional=True),
                   guard=None if guard is None else GuardVerdict.from_dict(guard, f"{where}.guard"),
                   notices=tuple(str(n) for n in notices))


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
    quantizer: str = "rtn"  # a name in quantizers.QUANTIZERS
    act_order: bool = False  # GPTQ only
    sequential: bool = False  # GPTQ only: each layer's Hessians after earlier layers are quantized
    column_bits: dict[str, tuple[int, ...]] = field(default_factory=dict)  # units with a mixed option
    model_content: str = ""  # content hash of the checkpoint the plan was made on (Inventory.content_id)
    provenance: Provenance = field(default_factory=Provenance)  # how it was made beyond the table

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise BitallocError(f"The 'quantizer' parameter must be one of {list(QUANTIZERS)}. Got {self.quantizer!r} instead.")

    @property
    def uses_importance(self) -> bool:
        """Whether the plan was made with the importance matrix: RTN scales by
        the weighted search, GGUF types by ggml with the imatrix (older plans
        and --no-imatrix: no)."""
        return self.provenance.importance is not None

    def only_option(self) -> str | None:
        """The option's name when every unit has the same one (a uniform plan), else None."""
        names = {o.name for o in self.assignment.values()}
        return names.pop() if len(names) == 1 else None

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
        missing, extra = sorted(names - set(self.assignment)), sorted(set(self.assignment) - names)
        if extra:
            raise PlanMismatchError(
                f"The plan assigns {len(extra)} unit(s) this model does not have (e.g. {extra[0]!r}); the file was "
                "edited or belongs to another model. Remove them, or make a plan with `bitalloc plan`.")
        if missing:
            raise PlanMismatchError(
                f"The plan lacks {len(missing)} unit(s) of this model (e.g. {missing[0]!r}). Give each an option, or "
                "make a plan with `bitalloc plan`.")
        for u in inventory.units:
            opt = self.assignment[u.name]
            if not fits(u.shape, opt, allow_ragged=self.allow_ragged):
                block = f"blocks of {opt.group_size} weights" if getattr(opt, "block_size", None) else \
                    f"groups of {opt.group_size} columns"
                raise PlanMismatchError(
                    f"The plan gives {u.name} the option {opt.name}, which stores rows in {block}; its "
                    f"{u.shape[1]} input columns are not a multiple of that. Choose an option that fits, or "
                    "regenerate the plan.")

        self.check_budget(inventory)

    def check_budget(self, inventory: Inventory) -> None:
        """The assignment fits the budget the plan records: a plan is solved
        for its budget, so one that exceeds it was edited (the budget, or the
        assignment past it), and applying it would not give what it says."""
        sizes = self.sizes(inventory)
        b = self.budget
        used = sizes.model_bytes if b.kind == "bytes" else sizes.model_bpw if b.over == "model" else sizes.quantized_bpw
        if used > b.value * (1 + 1e-9):
            shown = f"{used:,.0f} bytes" if b.kind == "bytes" else f"{used:.4f} bpw over the {b.over} weights"
            again = f"--bytes {b.value:.0f}" if b.kind == "bytes" else f"--bpw {b.value:g}"
            raise PlanMismatchError(
                f"The plan's assignment takes {shown}, more than its budget of {b.describe()}: the file was edited. "
                f"A plan's budget records what it was solved for; to keep this assignment set the budget to at least "
                f"{shown.split(' ')[0]}, or make a new plan with `bitalloc plan {again}`.")

    def to_dict(self, inventory: Inventory | None = None) -> dict:
        units = {name: opt.name for name, opt in self.assignment.items()}
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"identity": self.model_identity, "content": self.model_content, "label": self.model_label},
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
        if self.provenance.to_dict():
            data["provenance"] = self.provenance.to_dict()
        data["units"] = units
        if self.column_bits:
            data["column_bits"] = {name: list(bits) for name, bits in self.column_bits.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "The plan") -> "Plan":
        data = check_header(data, PLAN_FORMAT, PLAN_VERSION, where, "plan")
        model = need(data, "model", "object", where)
        units = string_map(need(data, "units", "object", where), where, "units")
        if not units:
            raise BitallocError(f"{where} assigns no unit ('units' is empty). Make a plan with `bitalloc plan`.")
        assignment = {}
        for name, opt in units.items():
            try:
                assignment[name] = parse_option(opt)
            except BitallocError as e:
                raise BitallocError(f"{where}: unit {name!r}: {e}") from None
        column_bits = need(data, "column_bits", "object", where, optional=True, default={})
        for name, bits in column_bits.items():
            if not isinstance(bits, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
                raise BitallocError(f"{where}: column_bits[{name!r}] must be a list of integers.")
        budget = need(data, "budget", "object", where)
        need(budget, "value", "number", f"{where}: budget")
        quantizer = need(data, "quantizer", "string", where, optional=True, default="rtn")
        if quantizer not in QUANTIZERS:
            raise BitallocError(f"{where}: 'quantizer' must be one of {list(QUANTIZERS)}; it holds {quantizer!r}.")
        keep_bits = need(data, "keep_bits", "int", where, optional=True, default=16)
        if keep_bits not in (16, 32):
            raise BitallocError(f"{where}: 'keep_bits' must be 16 or 32; it holds {keep_bits}.")
        return cls(
            assignment=assignment,
            model_identity=need(model, "identity", "string", f"{where}: model"),
            model_label=need(model, "label", "string", f"{where}: model", optional=True, default="?"),
            budget=Budget.from_dict(budget),
            scorer=need(data, "scorer", "string", where, optional=True, default="?"),
            solver=need(data, "solver", "string", where, optional=True, default="?"),
            objective=need(data, "objective", "number", where, optional=True),
            keep_bits=keep_bits,
            allow_ragged=need(data, "allow_ragged_groups", "bool", where, optional=True, default=False),
            constraints=Constraints.from_dict(need(data, "constraints", "object", where, optional=True, default={})),
            quantizer=quantizer,
            act_order=need(data, "act_order", "bool", where, optional=True, default=False),
            sequential=need(data, "sequential", "bool", where, optional=True, default=False),
            column_bits={name: tuple(b) for name, b in column_bits.items()},
            model_content=need(model, "content", "string", f"{where}: model", optional=True, default=""),
            provenance=Provenance.from_dict(need(data, "provenance", "object", where, optional=True, default={}), where),
        )

    def save(self, path: str, inventory: Inventory | None = None) -> None:
        write_json(path, self.to_dict(inventory))

    @classmethod
    def load(cls, path: str) -> "Plan":
        if not Path(path).exists():
            raise BitallocError(f"Plan file {path!r} does not exist. Make one with `bitalloc plan --out {path}`.")
        try:
            return cls.from_dict(read_json(path, "plan file"), where=f"Plan file {path!r}")
        except (TypeError, ValueError, KeyError) as e:  # a field of the right type holding a wrong value
            raise BitallocError(f"Plan file {path!r} is damaged: {e}.") from None
