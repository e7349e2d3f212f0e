"""`bitalloc compare --format gguf`: llama.cpp's own presets against bitalloc
plans of GGUF types at each preset's exact size, every file run by llama.cpp.

For each preset the source GGUF is quantized by ``llama_model_quantize``
(allow_requantize, the same importance matrix bitalloc plans with); the
preset's tensor data bytes become a ``--bytes`` budget; each scorer's plan
(refined and guarded as the plan settings say) is exported with
``write_gguf``; all files are evaluated by llama.cpp on the same windows,
KL and top-1 against the source file run by llama.cpp. Verdicts are paired
against the preset on the same windows."""

from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from bitalloc import api
from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, token_windows
from bitalloc.fileio import write_json
from bitalloc.problem import Budget
from bitalloc.report import table, versus, with_ci
from bitalloc.stats import method_note

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


@dataclass(frozen=True)
class GGUFCompareSettings:
    presets: tuple[str, ...] = PRESETS
    scorers: tuple[str, ...] = ("rtn-mse-rel",)
    eval: EvalSettings = EvalSettings(seq_len=512, windows=8)
    threads: int = 2

    def __post_init__(self) -> None:
        bad = [p for p in self.presets if p not in PRESETS]
        if bad:
            raise BitallocError(f"Unknown llama.cpp preset {bad[0]!r}; choose from {', '.join(PRESETS)}.")


def make_preset(source: str, out: str, preset: str, vectors: dict, threads: int = 2) -> None:
    """``llama_model_quantize`` of ``source`` to the preset, with the
    importance vectors (GGUF name -> (in,) float32) as its imatrix."""
    import llama_cpp
    import numpy as np

    entries = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()  # a NULL name ends the list
    keep = []  # the arrays must outlive the call
    for entry, (name, v) in zip(entries, vectors.items()):
        v = np.ascontiguousarray(v, dtype=np.float32)
        keep.append((name.encode(), v))
        entry.name, entry.size, entry.data = keep[-1][0], v.size, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize, params.nthread = True, threads
    if vectors:
        params.imatrix = entries
    with _captured_stderr() as log:  # llama.cpp prints a line per tensor that falls back to another type
        status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if status != 0:
        tail = " ".join("".join(log).split()[-40:])
        raise BitallocError(f"llama.cpp could not make the {preset} preset of {source}: {tail}")


@contextlib.contextmanager
def _captured_stderr():
    """File descriptor 2 (where llama.cpp's C code writes) sent to a temporary
    file for the block; its text is appended to the yielded list afterwards,
    so a failure can quote it."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            captured.append(log.read())


def tensor_bytes(path: str) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def compare_gguf(loaded: api.Loaded, settings: GGUFCompareSettings, plan_settings: api.PlanSettings, work: str, *,
                 text_path: str | None = None, encoding: str = "utf-8", progress: bool = True,
                 checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every preset and each scorer's plan at its size, run by llama.cpp;
    ``checkpoint(report so far)`` after each preset, so a long run shows its
    results as they come."""
    from bitalloc.evaluate.llamacpp import evaluate_gguf, llamacpp_logprobs
    from bitalloc.exporting import _arch, gguf_names, source_gguf
    from bitalloc.refine import make_probe
    from bitalloc.scorers import score

    t0 = time.perf_counter()
    source = source_gguf(loaded.source)
    loaded, plan_settings = api.prepare(loaded, plan_settings, progress)
    inv = loaded.inventory
    names = gguf_names(inv, loaded.model.config.num_hidden_layers, _arch(source))
    vectors = {names[n]: v.numpy() for n, v in (loaded.importance or {}).items()}
    options, notices = api.resolve_menu(inv, plan_settings.menu)
    ctx = api.scoring_context(loaded, plan_settings, options, progress=progress)
    tables = score(ctx, list(settings.scorers))
    seconds = {"tables": time.perf_counter() - t0}
    text, label = api.eval_text(text_path, encoding)
    windows = token_windows(loaded.tokenizer, text, settings.eval)
    reference = llamacpp_logprobs(source, windows, progress=api._tqdm(progress))
    def report() -> dict:
        return {"model": loaded.source.label, "source": source, "text": label, "eval": settings.eval.to_dict(),
                "menu": [o.name for o in options], "notices": list(inv.notices) + notices, "rows": rows,
                "seconds": {**seconds, "total": time.perf_counter() - t0},
                "note": "every file run by llama.cpp; KL and top-1 against the source GGUF run by llama.cpp; sizes "
                        "are tensor data bytes (metadata apart); bitalloc's budget is the preset's exact tensor data "
                        "bytes",
                "method": method_note(settings.eval.windows, rows[0]["tokens"] if rows else 0,
                                      baseline="the llama.cpp preset of the same size", column="vs preset")}

    probe = make_probe(loaded, plan_settings) if plan_settings.guard or plan_settings.refine.rounds else None
    rows = []
    Path(work).mkdir(parents=True, exist_ok=True)
    for preset in settings.presets:
        path = str(Path(work) / f"preset-{preset}.gguf")
        make_preset(source, path, preset, vectors, settings.threads)
        size = tensor_bytes(path)
        base = {"preset": preset, "method": f"llama.cpp {preset}", "file": path, "tensor_bytes": size,
                **evaluate_gguf(path, windows, reference).to_dict()}
        rows.append(base)
        s = replace(plan_settings, budget=Budget(float(size), "bytes", "model"))
        for scorer in settings.scorers:
            row = _plan_row(loaded, tables[scorer], replace(s, scorer=scorer), probe, source, names, vectors,
                            str(Path(work) / f"bitalloc-{scorer}-{preset}.gguf"), progress)
            row.update(preset=preset, **evaluate_gguf(row["file"], windows, reference).to_dict())
            row["vs_preset"] = versus(row, base)
            rows.append(row)
        if checkpoint is not None:
            checkpoint(report())
    return report()


def _plan_row(loaded: api.Loaded, table, settings: api.PlanSettings, probe, source: str, names: dict[str, str],
              vectors: dict, out: str, progress: bool) -> dict:
    """Solve (and refine/guard) a plan at the preset's bytes and write it as a GGUF from the source."""
    from bitalloc.export.gguf import write_gguf
    from bitalloc.refine import finish_plan

    t1 = time.perf_counter()
    plan = api.solve_plan(loaded.inventory, table, settings, loaded.source.label)
    plan = finish_plan(loaded, plan, table, settings, probe=probe, progress=api._tqdm(progress))
    types = {names[n]: o.name for n, o in plan.assignment.items()}
    info = write_gguf(source, out, types, importance={names[n]: vectors[names[n]] for n, o in plan.assignment.items()
                                                      if o.uses_importance and names[n] in vectors})
    return {"method": f"bitalloc {plan.scorer}", "file": out, "tensor_bytes": info["tensor_data_bytes"],
            "plan_seconds": time.perf_counter() - t1, "types": _type_counts(types), "provenance": plan.provenance}


def _type_counts(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def kl_change(row: dict, preset: dict) -> str:
    """'-46.2 %': the row's KL relative to the preset's."""
    if row is preset or not preset.get("kl"):
        return ""
    return f"{100 * (row['kl'] / preset['kl'] - 1):+.1f} %"


def markdown(report: dict) -> str:
    rows, preset = [], None
    for r in report["rows"]:
        preset = r if r["method"].startswith("llama.cpp") else preset
        rows.append([r["method"], f"{r['tensor_bytes'] / 1e6:.3f}", with_ci(r, "ppl", 2, fixed=True),
                     with_ci(r, "kl", 4, fixed=True), kl_change(r, preset), with_ci(r, "top1", 3, fixed=True),
                     r.get("vs_preset", "")])
    headers = ["method", "MB (tensor data)", "ppl [95 %]", "KL [95 %]", "KL vs preset", "top-1 [95 %]", "vs preset"]
    return (f"model: {report['model']} (reference: the source GGUF run by llama.cpp)\ntext: {report['text']}\n"
            + table(headers, rows) + "\n" + report["method"])


def write_report(report: dict, out_dir: str) -> list[str]:
    from bitalloc.fileio import write_atomic

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    json_path, md_path = f"{out_dir}/compare.json", f"{out_dir}/compare.md"
    write_json(json_path, {"format": "bitalloc.report", **report})
    text = markdown(report)
    write_atomic(md_path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return [json_path, md_path]


def cmd_compare_gguf(args) -> None:
    """`bitalloc compare --format gguf` after the command's checks (commands.cmd_compare)."""
    from bitalloc.checks import _scorers_of
    from bitalloc.commands import eval_settings, plan_settings

    settings = GGUFCompareSettings(tuple(args.presets or PRESETS), _scorers_of(args), eval_settings(args))
    plan = plan_settings(args, 1.0)  # each preset's size replaces this budget
    loaded = api.load(args.model, embeddings=True)
    report = compare_gguf(loaded, settings, plan, f"{args.out}/gguf", text_path=args.text, encoding=args.encoding,
                          progress=not args.quiet, checkpoint=lambda partial: write_report(partial, args.out))
    print(markdown(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")
