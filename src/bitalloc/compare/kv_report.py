"""The outputs of `bitalloc kv`: the markdown table, the figure, the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitalloc.compare.report import with_ci
from bitalloc.fileio import write_atomic, write_json


def markdown(report: dict) -> str:
    lines = [f"# KV cache: {report['model']}", "",
             f"Text: {report['text']}; {report['eval']['windows']} windows of {report['eval']['seq_len']} tokens. "
             f"Scorer {report['scorer']} (probe {report['probe']}), calibration {report['calib']['windows']} × "
             f"{report['calib']['seq_len']} tokens of {report['calibration_text']}.", "",
             f"Reference (float32 cache): ppl {with_ci(report['reference'], 'ppl')}", "",
             f"| row | bpe | cache MB @ {report['context']} | ppl | KL | top-1 | vs best uniform within budget |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        vs = r.get("vs_uniform")
        vs_text = "" if not vs else f"{vs['verdict']} vs {vs['baseline']} (KL {100 * vs['kl_change']:+.1f} %)"
        if r.get("vs_plan"):
            vs_text += f"; {r['vs_plan']['verdict']} vs {r['vs_plan']['baseline']}"
        lines.append(f"| {r['name']} | {r['bpe']:.3f} | {r['cache_mb']:.1f} | {with_ci(r, 'ppl')} | "
                     f"{with_ci(r, 'kl', 4)} | {with_ci(r, 'top1')} | {vs_text} |")
    if "llamacpp" in report:
        lc = report["llamacpp"]
        lines += ["", f"llama.cpp ({lc['reference']}), budget {lc['budget_bpe']} bits per value; bitalloc picks "
                      f"`{lc['picked']['flags']}`", "", "| K/V | bpe | ppl | KL | top-1 | picked pair vs this |",
                  "|---|---|---|---|---|---|"]
        for r in lc["rows"]:
            lines.append(f"| {r['name']}{' (picked)' if r['picked'] else ''} | {r['bpe']:.3f} | {with_ci(r, 'ppl')} | "
                         f"{with_ci(r, 'kl', 4)} | {with_ci(r, 'top1')} | {r.get('picked_vs_this', '')} |")
    lines += ["", report.get("method_note", "")]
    return "\n".join(lines) + "\n"


def figure(report: dict):
    """Left: KL against bits per value (uniform codecs, plans, per-token rows). Right: the bits of each
    unit in the first plan (layers × heads, keys then values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = [r for r in report["rows"] if r["method"] == "bitalloc"]
    fig, axes = plt.subplots(1, 2 if plans else 1, figsize=(13 if plans else 7, 5), squeeze=False)
    ax = axes[0][0]
    styles = {"uniform": dict(color="black", marker="s", linestyle="none"),
              "bitalloc": dict(color="tab:blue", marker="o", linestyle="-"),
              "per-token": dict(color="tab:orange", marker="^", linestyle="-")}
    for method, style in styles.items():
        pts = sorted((r["bpe"], max(r["kl"], 1e-6), r["name"]) for r in report["rows"] if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
            if method == "uniform":
                for x, y, name in pts:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per cached value (scales and norms included)")
    ax.set_ylabel("KL to the float32 cache, nats/token (log)")
    ax.set_title(f"KV cache at {report['eval']['seq_len']} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if plans:
        heat = plans[0]["heatmap"]
        grid = np.concatenate([np.array(heat["k"]), np.array(heat["v"])], axis=1)  # (layers, 2 * heads)
        im = axes[0][1].imshow(grid.T, aspect="auto", cmap="viridis", origin="lower")
        heads = len(heat["k"][0])
        axes[0][1].set_yticks(range(2 * heads), [f"{k} h{h}" for k in "kv" for h in range(heads)], fontsize=7)
        axes[0][1].set_xlabel("layer")
        axes[0][1].set_title(f"{plans[0]['name']}: bits per value of each unit")
        fig.colorbar(im, ax=axes[0][1])
    fig.suptitle(report["model"], fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(report: dict, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "kv.json", report)
    write_atomic(out / "kv.md", lambda tmp: Path(tmp).write_text(markdown(report)))
    fig = figure(report)
    write_atomic(out / "kv.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return [str(out / n) for n in ("kv.json", "kv.md", "kv.png")]
