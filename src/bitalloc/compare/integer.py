"""`bitalloc compare`: every scorer x quantizer x budget on one model and
text, beside the uniform and llama.cpp-rule baselines; a table, a plot of
perplexity against bpw, and the Spearman correlation of each scorer's
per-unit sensitivity with the measured end-to-end KL sensitivity."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bitalloc import api
from bitalloc.compare.report import staged_tables, versus, with_ci
from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings
from bitalloc.evaluate.stats import method_note
from bitalloc.fileio import write_atomic, write_json
from bitalloc.formats.affine import QuantOption
from bitalloc.quantizers import QUANTIZERS, any_sequential, gathers_every_gram
from bitalloc.scorers import SCORERS
from bitalloc.solve.baselines import moe_rule_plan, structural_moe_units
from bitalloc.stages import STAGE_HEADERS, Stages, stage_rows

BASELINES = ("uniform", "llama-rule", "moe-rule")


@dataclass(frozen=True)
class CompareSettings:
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    scorers: tuple[str, ...] = tuple(SCORERS)
    quantizers: tuple[str, ...] = tuple(QUANTIZERS)
    eval: EvalSettings = EvalSettings(seq_len=512, windows=4)
    sensitivity_option: str = "int3-g64-asym"  # where per-unit sensitivities are compared

    def __post_init__(self) -> None:
        for s in self.scorers:
            if s not in SCORERS:
                raise BitallocError(f"Unknown scorer {s!r}; choose from {sorted(SCORERS)}.")


def spearman(scorer_sens: np.ndarray, measured: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(scorer_sens) & np.isfinite(measured)
    return float(spearmanr(scorer_sens[ok], measured[ok]).statistic)


def correlations(tables: dict, option: QuantOption) -> dict[str, float]:
    """Spearman rho of each table's per-unit sensitivity at ``option`` with the kl table's."""
    if "kl" not in tables:
        return {}
    measured = tables["kl"].sensitivity(option)
    return {name: spearman(t.sensitivity(option), measured) for name, t in tables.items() if name != "kl"}


def compare(loaded: api.Loaded, settings: CompareSettings, plan_settings: api.PlanSettings, *,
            progress: bool = True, stages: Stages | None = None) -> dict:
    """Every row of ``settings``; each stage's seconds and peak memory in
    ``stages`` (a fresh one unless given) and in the report."""
    stages = stages or Stages()
    with stages("importance matrix and menu"):
        loaded, plan_settings = api.prepare(loaded, plan_settings, progress)
    options, notices = api.resolve_menu(loaded.inventory, plan_settings.menu)
    ctx = api.scoring_context(loaded, plan_settings, options, progress=progress)
    tables = staged_tables(ctx, settings.scorers, stages)
    score_s = {name: stages.rows[f"table {name}"]["seconds"] for name in settings.scorers}
    with stages("reference"):
        report, bench = api.reference_block(loaded, settings.eval, None, plan_settings.keep_bits, progress)
    one_shot = [q for q in settings.quantizers if gathers_every_gram(q, plan_settings.sequential)]
    hessians = ctx.hessians if one_shot else None
    report.update(menu=[o.name for o in options], notices=list(loaded.inventory.notices) + notices,
                  scoring_seconds=score_s, rows=[],
                  calib=plan_settings.calib.to_dict(), scorer_settings=plan_settings.scorer_settings.__dict__)
    first = tables[settings.scorers[0]]
    if plan_settings.sequential and any_sequential(settings.quantizers):
        from bitalloc.calib.grams import calibration_windows

        bench.calib_windows = calibration_windows(loaded.tokenizer, ctx.calib_text, plan_settings.calib)
    for quantizer in settings.quantizers:
        bench.hessians = hessians if quantizer in one_shot else None
        for value in settings.budgets:
            s = replace(plan_settings, budget=replace(plan_settings.budget, value=value), quantizer=quantizer)
            plans = {
                "uniform": api.uniform_plan(loaded.inventory, options, s, loaded.source.label, table=first),
                "llama-rule": api.llama_rule_plan(loaded.inventory, options, s, loaded.source.label, table=first),
            }
            if structural_moe_units(loaded.inventory):  # an MoE: QuantMoE-Bench's structural rule too
                plans["moe-rule"] = moe_rule_plan(loaded.inventory, options, s, loaded.source.label, table=first)
            for name in settings.scorers:
                plans[name] = api.solve_plan(loaded.inventory, tables[name], replace(s, scorer=name), loaded.source.label)
            for method, p in plans.items():
                with stages(f"{quantizer} {method} {value:g}: quantize and evaluate"):
                    row = api.plan_row(loaded, p, bench, progress, f"{quantizer} {method} {value:g}")
                report["rows"].append({"quantizer": quantizer, "budget": value, "method": method,
                                       "detail": p.scorer, **row})
    ref_opt = QuantOption.parse(settings.sensitivity_option)
    report["spearman_vs_kl"] = correlations(tables, ref_opt) if ref_opt in options else {}
    report["sensitivity_option"] = settings.sensitivity_option
    report["stages"] = stages.to_dict()
    return report


def markdown(report: dict) -> str:
    ref = report["reference"]
    lines = [f"Reference perplexity {with_ci(ref, 'ppl', 4)} ({report['model']}; {report['model_note']}).", "",
             "| quantizer | budget | method | ppl | KL | top-1 | vs uniform | bpw | code bpw | model MB | "
             "s (quantize + eval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    uniform = {(r["quantizer"], r["budget"]): r for r in report["rows"] if r["method"] == "uniform"}
    for r in report["rows"]:
        name = r["method"] if r["method"] not in BASELINES else f"{r['method']} ({r['detail'].split(':', 1)[-1]})"
        base = uniform.get((r["quantizer"], r["budget"]))
        verdict = "" if base is None or base is r else versus(r, base)
        metrics = f"{with_ci(r, 'ppl', 4)} | {with_ci(r, 'kl')} | {with_ci(r, 'top1', fixed=True)}"
        lines.append(f"| {r['quantizer']} | {r['budget']:g} | {name} | {metrics} | {verdict} | {r['bpw']:.4f} | "
                     f"{r['code_bpw']:.4f} | {r['model_mb']:.2f} | {r['seconds']:.1f} |")
    lines += ["", method_note(report["eval"]["windows"], ref["tokens"],
                                 baseline="the uniform row of the same quantizer and budget")]
    if report.get("spearman_vs_kl"):
        lines += ["", f"Spearman correlation of per-unit sensitivity at {report['sensitivity_option']} with the measured "
                  "`kl` sensitivity:", "", "| scorer | Spearman rho |", "|---|---|"]
        lines += [f"| {k} | {v:+.3f} |" for k, v in sorted(report["spearman_vs_kl"].items(), key=lambda kv: -kv[1])]
    lines += ["", "Scoring time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["scoring_seconds"].items())]
    if report.get("stages"):
        lines += ["", "Stages:", "", "| " + " | ".join(STAGE_HEADERS) + " |", "|---" * len(STAGE_HEADERS) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in stage_rows(report["stages"])]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """The figure of ``report`` written as a PNG at 110 dpi."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def figure(report: dict):
    """Perplexity (log) against realized bpw, one line per method, a panel per quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantizers = list(dict.fromkeys(r["quantizer"] for r in report["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    scorers = [m for m in methods if m not in BASELINES]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(scorers), 2)))
    markers = "o^sDv<>pPXh*"
    fig, axes = plt.subplots(1, len(quantizers), figsize=(6.5 * len(quantizers), 5.5), sharey=True, squeeze=False)
    for ax, q in zip(axes[0], quantizers):
        rows = [r for r in report["rows"] if r["quantizer"] == q]
        for method in methods:
            pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == method)
            if method in BASELINES:
                style = dict(color="black" if method == "uniform" else "dimgray", linestyle="--", linewidth=2.2,
                             marker="s" if method == "uniform" else "D")
            else:
                i = scorers.index(method)
                style = dict(color=colors[i], linestyle="-", linewidth=1.3, marker=markers[i % len(markers)])
            ax.plot(*zip(*pts), label=method, markersize=5, **style)
        ax.axhline(report["reference"]["ppl"], color="black", linestyle=":", label="reference")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight over quantized units (codes + fp16 scales/zeros)")
        ax.set_title(f"{q.upper()}: perplexity vs size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity (log scale)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(report["model"], fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(report: dict, out_dir: str) -> list[str]:
    out = Path(out_dir)
    write_json(out / "compare.json", report)
    write_atomic(out / "compare.md", lambda tmp: Path(tmp).write_text(markdown(report)))
    plot(report, str(out / "compare.png"))
    return [str(out / n) for n in ("compare.json", "compare.md", "compare.png")]
