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

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from bitalloc import api
from bitalloc.compare.report import staged_tables, table, versus, with_ci
from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, token_windows
from bitalloc.evaluate.stats import method_note
from bitalloc.fileio import write_json
from bitalloc.formats.gguf_types import PRESETS
from bitalloc.solve.problem import Budget
from bitalloc.stages import STAGE_HEADERS, Stages, stage_rows

REPORT_NOTE = ("every file run by llama.cpp; KL and top-1 against the source GGUF run by llama.cpp; sizes are tensor "
               "data bytes (metadata apart); bitalloc's budget is the preset's exact tensor data bytes")


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


def tensor_bytes(path: str) -> int:
    from bitalloc.model.gguf_header import read_gguf_header

    return read_gguf_header(path).tensor_data_bytes


def compare_gguf(loaded: api.Loaded, settings: GGUFCompareSettings, plan_settings: api.PlanSettings, work: str, *,
                 text_path: str | None = None, encoding: str = "utf-8", progress: bool = True,
                 checkpoint: Callable[[dict], None] | None = None, stages: Stages | None = None) -> dict:
    """Every preset and each scorer's plan at its size, run by llama.cpp;
    ``checkpoint(report so far)`` after each file. A crash inside llama.cpp
    (``LlamaCppCrash``) is raised after the rows so far are checkpointed.
    Each stage's seconds and peak memory go to ``stages`` and the report."""
    from bitalloc.evaluate.llamacpp import LlamaCpp, LlamaCppCrash
    from bitalloc.export.gguf_plan import source_gguf
    from bitalloc.solve.refine import make_probe

    t0 = time.perf_counter()
    stages = stages or Stages()
    source = source_gguf(loaded.source)
    loaded, plan_settings, names, vectors, options, notices, tables = _measure(loaded, settings, plan_settings, source,
                                                                               stages, progress)
    inv, source_matrices = loaded.inventory, _matrix_types(source)
    seconds = {"tables": time.perf_counter() - t0}
    text, label = api.eval_text(text_path, encoding)
    windows = token_windows(loaded.tokenizer, text, settings.eval)
    rows: list[dict] = []

    head = {"model": loaded.source.label, "source": source, "text": label, "eval": settings.eval.to_dict(),
            "menu": [o.name for o in options], "source_types": _type_counts({n: t for n, (t, _) in
                                                                             source_matrices.items()}),
            "note": REPORT_NOTE}

    def report(stopped: str | None = None) -> dict:
        return {**head, "notices": list(inv.notices) + notices + list(runner.notices), "rows": rows,
                "seconds": {**seconds, "total": time.perf_counter() - t0}, "stages": stages.to_dict(),
                "method": method_note(settings.eval.windows, rows[0]["tokens"] if rows else 0,
                                      baseline="the llama.cpp preset of the same size", column="vs preset"),
                **({"stopped": stopped} if stopped else {})}

    probe = make_probe(loaded, plan_settings) if plan_settings.guard or plan_settings.refine.rounds else None
    Path(work).mkdir(parents=True, exist_ok=True)
    with LlamaCpp(n_threads=settings.threads, progress=api._tqdm(progress)) as runner:
        stages.children = runner.pids
        try:
            with stages("llama.cpp reference"):
                reference = runner.logprobs(source, windows, desc="llama.cpp reference")
            bench = _Bench(loaded, plan_settings, tables, probe, source, source_matrices, names, vectors, work, runner,
                           windows, reference, progress, stages)
            for preset in settings.presets:
                for row in bench.preset_rows(preset, settings):
                    rows.append(row)
                    if checkpoint is not None:
                        checkpoint(report())
        except LlamaCppCrash as crash:
            if checkpoint is not None:
                checkpoint(report(stopped=str(crash)))
            raise
        return report()


def _measure(loaded: api.Loaded, settings: GGUFCompareSettings, plan_settings: api.PlanSettings, source: str,
             stages: Stages, progress: bool) -> tuple:
    """The importance matrix, the menu and each scorer's table, stage by
    stage: (loaded, plan settings, GGUF names, importance vectors by GGUF
    name, options, notices, tables)."""
    from bitalloc.export.gguf_plan import _arch, gguf_names

    if loaded.tokenizer is None:
        raise BitallocError(f"{loaded.source.label} holds no tokenizer that transformers can read; comparing files "
                            "needs text to run them on. Use a GGUF file with its tokenizer.")
    with stages("importance matrix and menu"):
        loaded, plan_settings = api.prepare(loaded, plan_settings, progress)
    inv = loaded.inventory
    names = gguf_names(inv, loaded.model.config.num_hidden_layers, _arch(source))
    vectors = {names[n]: v.numpy() for n, v in (loaded.importance or {}).items()}
    options, notices = api.resolve_menu(inv, plan_settings.menu)
    ctx = api.scoring_context(loaded, plan_settings, options, progress=progress)
    return loaded, plan_settings, names, vectors, options, notices, staged_tables(ctx, settings.scorers, stages)


@dataclass(frozen=True)
class _Bench:
    """What every preset's rows share: the model and its tables, the source
    file and its names, llama.cpp and the reference on the windows."""

    loaded: api.Loaded
    plan_settings: api.PlanSettings
    tables: dict
    probe: object
    source: str
    source_matrices: dict  # ``_matrix_types`` of the source, read once
    names: dict[str, str]
    vectors: dict
    work: str
    runner: object
    windows: object
    reference: object
    progress: bool
    stages: Stages

    def preset_rows(self, preset: str, settings: GGUFCompareSettings) -> Iterator[dict]:
        """The preset's row, then each scorer's plan at its exact size, each
        as soon as llama.cpp has measured it."""
        path = str(Path(self.work) / f"preset-{preset}.gguf")
        with self.stages(f"{preset}: llama.cpp quantizes the preset"):
            self.runner.quantize(self.source, path, preset, self.vectors)
        size = tensor_bytes(path)
        base = {"preset": preset, "method": f"llama.cpp {preset}", "file": path, "tensor_bytes": size,
                **self._evaluate(path, f"{preset}: llama.cpp runs the preset", f"llama.cpp {preset}"),
                **_source_share(path, self.source_matrices)}
        yield base
        s = replace(self.plan_settings, budget=Budget(float(size), "bytes", "model"))
        for scorer in settings.scorers:
            out = str(Path(self.work) / f"bitalloc-{scorer}-{preset}.gguf")
            with self.stages(f"{preset}: plan {scorer} (solve, guard, write)"):
                row = _plan_row(self.loaded, self.tables[scorer], replace(s, scorer=scorer), self.probe,
                                self.source, self.names, self.vectors, out, self.progress)
            row.update(preset=preset, **_source_share(out, self.source_matrices),
                       **self._evaluate(out, f"{preset}: llama.cpp runs plan {scorer}", f"llama.cpp bitalloc {scorer}"))
            row["vs_preset"] = versus(row, base)
            yield row

    def _evaluate(self, path: str, stage: str, desc: str) -> dict:
        with self.stages(stage):
            return self.runner.evaluate(path, self.windows, self.reference, desc=desc).to_dict()


def _matrix_types(path: str) -> dict[str, tuple[str, int]]:
    """Tensor name -> (GGUF type name, number of weights) of each matrix (2-D or more) in the file."""
    from bitalloc.formats.ggml import GGML_TYPE_IDS
    from bitalloc.model.gguf_header import read_gguf_header

    by_id = {v: k for k, v in GGML_TYPE_IDS.items()}
    return {t.name: (by_id.get(t.type_id, f"type {t.type_id}"), math.prod(t.shape))
            for t in read_gguf_header(path).tensors if len(t.shape) >= 2}


def _source_share(path: str, theirs: dict[str, tuple[str, int]]) -> dict:
    """The share of the file's matrix weights stored in the type the source
    (``theirs``: its ``_matrix_types``) stores them in: requantizing to the
    source's own type re-stores those weights (nearly) exactly, which
    flatters the file that does it."""
    mine = _matrix_types(path)
    total = sum(n for _, n in mine.values())
    same = sum(n for name, (t, n) in mine.items() if name in theirs and theirs[name][0] == t)
    return {"source_type_share": same / total if total else 0.0}


def _plan_row(loaded: api.Loaded, table, settings: api.PlanSettings, probe, source: str, names: dict[str, str],
              vectors: dict, out: str, progress: bool) -> dict:
    """Solve (and refine/guard) a plan at the preset's bytes and write it as a GGUF from the source."""
    from bitalloc.export.gguf import write_gguf
    from bitalloc.solve.refine import finish_plan

    t1 = time.perf_counter()
    plan = api.solve_plan(loaded.inventory, table, settings, loaded.source.label)
    plan = finish_plan(loaded, plan, table, settings, probe=probe, progress=api._tqdm(progress))
    types = {names[n]: o.name for n, o in plan.assignment.items()}
    info = write_gguf(source, out, types, importance={names[n]: vectors[names[n]] for n, o in plan.assignment.items()
                                                      if o.uses_importance and names[n] in vectors})
    return {"method": f"bitalloc {plan.scorer}", "file": out, "tensor_bytes": info["tensor_data_bytes"],
            "plan_seconds": time.perf_counter() - t1, "types": _type_counts(types), "provenance": plan.provenance.to_dict()}


def _type_counts(types: dict[str, str]) -> dict[str, int]:
    """Type name -> how many tensors, of {tensor name: type name}."""
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
                     r.get("vs_preset", ""), _share(r)])
    headers = ["method", "MB (tensor data)", "ppl [95 %]", "KL [95 %]", "KL vs preset", "top-1 [95 %]", "vs preset",
               "in source's type"]
    stopped = f"\nstopped early: {report['stopped']}" if report.get("stopped") else ""
    source = ", ".join(f"{n} x {t}" for t, n in report.get("source_types", {}).items())
    stages = f"\n\nstages:\n{table(STAGE_HEADERS, stage_rows(report['stages']))}" if report.get("stages") else ""
    return (f"model: {report['model']} (reference: the source GGUF run by llama.cpp; its matrices: {source})\n"
            f"text: {report['text']}\n" + table(headers, rows) + "\n" + report["method"]
            + "\n'in source's type': the share of matrix weights stored in the type the source stores them in, "
              "which re-stores them (nearly) exactly" + stages + stopped)


def _share(row: dict) -> str:
    return f"{100 * row['source_type_share']:.1f} %" if "source_type_share" in row else ""


def headline(report: dict, seconds: float) -> str:
    """What `bitalloc demo` prints: the comparison of the first preset with
    bitalloc's file, the table, the verdict in words, the files and the time."""
    from bitalloc.evaluate.stats import WindowSums, compare_windows

    preset, ours = report["rows"][0], report["rows"][1]
    diffs = compare_windows(WindowSums.from_dict(ours["window_sums"]), WindowSums.from_dict(preset["window_sums"]))
    said = {"better": [], "worse": [], "within noise": []}
    for metric, d in diffs.items():
        said[d.verdict].append({"ppl": "perplexity", "kl": "KL", "top1": "top-1"}[metric])
    verdict = "; ".join(f"{word} on {', '.join(names)}" for word, names in said.items() if names)
    ev = report["eval"]
    mix = ", ".join(f"{n} x {t}" for t, n in sorted(ours["types"].items(), key=lambda kv: -kv[1]))
    return "\n".join([
        f"bitalloc demo: {report['model']}",
        f"llama.cpp's {preset['preset']} preset against bitalloc's plan of llama.cpp types at exactly its size; both "
        f"files run by llama.cpp on {ev['windows']} windows x {ev['seq_len']} tokens of {report['text']}, which no "
        "step calibrated on. Reference: the source GGUF run by llama.cpp (its weights already sit on a 4-bit grid; "
        "it is not an fp16 original).", "", markdown(report), "",
        f"bitalloc's file at {ours['tensor_bytes'] / 1e6:.3f} MB (the preset: {preset['tensor_bytes'] / 1e6:.3f} MB): "
        f"KL {ours['kl']:.4f} against {preset['kl']:.4f} ({kl_change(ours, preset)}), top-1 {ours['top1']:.3f} "
        f"against {preset['top1']:.3f}, perplexity {ours['ppl']:.2f} against {preset['ppl']:.2f}: {verdict} (95 % "
        f"interval of the paired difference over {ev['windows']} windows).",
        f"bitalloc's mix: {mix}.",
        f"files: {preset['file']} (llama.cpp's), {ours['file']} (bitalloc's); run either with llama.cpp "
        "(llama-cli -m FILE, or llama_cpp.Llama(model_path=FILE)).",
        f"took {seconds / 60:.1f} min ({report['seconds']['tables']:.0f} s of it for the error table).",
    ])


def write_report(report: dict, out_dir: str) -> list[str]:
    from bitalloc.fileio import write_atomic

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    json_path, md_path = f"{out_dir}/compare.json", f"{out_dir}/compare.md"
    write_json(json_path, {"format": "bitalloc.report", **report})
    text = markdown(report)
    write_atomic(md_path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return [json_path, md_path]


