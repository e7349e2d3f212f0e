"""Plain-text tables for the CLI (the only place besides progress bars that
prints), and what both comparisons share: error tables measured stage by stage."""

from __future__ import annotations

from typing import Sequence

from bitalloc.evaluate.stats import WindowSums, compare_windows, method_note, verdict_label
from bitalloc.stages import Stages


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def num(v: float | None, digits: int = 3, *, fixed: bool = False) -> str:
    """A short number: ``digits`` significant digits (decimals with ``fixed``),
    whole numbers once the integer part alone has that many digits."""
    if v is None:
        return "-"
    if fixed:
        return f"{v:.{digits}f}"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return "0" if v == 0 else f"{v:#.{digits}g}".rstrip(".")


def with_ci(row: dict, name: str, digits: int = 3, *, fixed: bool = False) -> str:
    """``81.12 [76.03, 86.91]``: the value and its interval, when the row has one."""
    ci = row.get(f"{name}_ci")
    point = num(row.get(name), digits, fixed=fixed)
    return point if not ci else f"{point} [{num(ci[0], digits, fixed=fixed)}, {num(ci[1], digits, fixed=fixed)}]"


def measures(row: dict) -> str:
    """Perplexity, KL and top-1 with their intervals, on one line."""
    return f"ppl {with_ci(row, 'ppl')}  KL {with_ci(row, 'kl', 4)}  top-1 {with_ci(row, 'top1')}"


def versus(row: dict, baseline: dict) -> str:
    """Paired verdict of ``row`` against ``baseline`` on ppl, KL and top-1;
    "n/a" when either lacks per-window sums (a report from an older version)."""
    if not row.get("window_sums") or not baseline.get("window_sums"):
        return "n/a"
    return verdict_label(compare_windows(WindowSums.from_dict(row["window_sums"]),
                                         WindowSums.from_dict(baseline["window_sums"])))


def run_report(report: dict) -> str:
    ev = report["eval"]
    ref = report["reference"]
    out = [
        f"model: {report['model']}",
        f"  ({report['model_note']})",
        f"units: {report['units']} linear weights, {report['quantized_numel'] / 1e6:.2f} M weights quantized; "
        f"{report['kept_numel'] / 1e6:.2f} M kept at fp16 (embeddings, norms; tied once)",
        f"text: {report['text']}; {ev['windows']} windows x {ev['seq_len']} tokens = {ref['tokens']} predicted tokens",
        f"reference perplexity: {with_ci(ref, 'ppl', 4)}   size at fp16: {ref['model_mb']:.1f} MB",
        "",
    ]
    headers = ["budget", "method", "options", "bpw", "code bpw", "model bpw", "MB", "ppl", "KL", "top-1", "vs uniform"]
    rows = []
    for entry in report["budgets"]:
        b = entry["budget"]
        label = f"{b['value']:g} bpw" if b["kind"] == "bpw" else f"{b['value'] / 1e6:.2f} MB"
        uni = entry["uniform"]
        rows.append([label, "uniform", uni["option"], uni["bpw"], uni["code_bpw"], uni["model_bpw"], uni["model_mb"],
                     *_metrics(uni), ""])
        for scorer, r in entry["allocated"].items():
            guarded = r.get("provenance", {}).get("guard", {}).get("kept") == "uniform"
            kinds = "uniform (guard)" if guarded else f"{len(r['options_used'])} kinds"
            rows.append(["", f"alloc {scorer}", kinds, r["bpw"], r["code_bpw"],
                         r["model_bpw"], r["model_mb"], *_metrics(r), versus(r, uni)])
    out.append(table(headers, rows))
    out += ["", f"{report['bpw_note']}.", "KL: mean KL(reference || quantized) per token, nats; top-1: share of "
            "positions where the quantized model's most likely next token equals the reference's.",
            method_note(ev["windows"], ref["tokens"])]
    if any(r.get("provenance", {}).get("guard", {}).get("kept") == "uniform"
           for e in report["budgets"] for r in e["allocated"].values()):
        out.append("uniform (guard): the allocation measured worse than the uniform plan on calibration KL, so the "
                   "uniform plan was kept (--no-guard returns the allocation).")
    for n in report.get("notices", []):
        out.append(f"notice: {n}")
    return "\n".join(out)


def _metrics(row: dict) -> list[str]:
    return [with_ci(row, "ppl", 4), with_ci(row, "kl"), with_ci(row, "top1", fixed=True)]


def staged_tables(ctx, scorers: tuple[str, ...], stages: Stages) -> dict:
    """Each scorer's table, the shared weight-error sweep measured first as
    a stage of its own (the scorers in ``SWEEP_SCORERS`` read it)."""
    from bitalloc.scorers import score

    units = len(ctx.inventory.units)
    if any(s in SWEEP_SCORERS for s in scorers):
        with stages("weight-error sweep", units=units):
            ctx.reductions(["mse"])
    tables = {}
    for name in scorers:
        with stages(f"table {name}", units=units):
            tables.update(score(ctx, [name]))
    return tables


# The scorers whose tables start from the relative weight error of every option (the sweep's 'mse')
SWEEP_SCORERS = frozenset({"rtn-mse", "rtn-mse-rel", "kl", "kl-block", "linearity"})
