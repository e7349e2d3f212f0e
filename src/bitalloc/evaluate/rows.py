"""What every side-by-side table shares: the evaluation windows and the
reference's log-probs (``reference_block``), and one row per plan, quantized
in memory, evaluated on those windows and restored (``plan_row``). Used by
``api.run`` and ``compare.integer``; ``loaded`` is an ``api.Loaded``. And a GGUF file
evaluated in llama.cpp itself (``evaluate_in_llamacpp``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, reference_logprobs, reference_result, token_windows
from bitalloc.evaluate import evaluate as evaluate_windows
from bitalloc.evaluate.text import read_text_file, wiki_text
from bitalloc.plan import Plan


def progress_bar(enabled: bool) -> Callable | None:
    """A quiet tqdm wrapper (bars that vanish when done), or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, leave=False, **kw)


def eval_text(text_path: str | None, encoding: str = "utf-8") -> tuple[str, str]:
    """(text, label): a user's file, or the evaluation part of the offline Wikipedia sample."""
    if text_path:
        return read_text_file(text_path, encoding), text_path
    return wiki_text("eval"), "gensim enwiki sample, evaluation half (even-numbered articles)"


@dataclass
class EvalBench:
    """Windows, reference log-probs and GPTQ state shared by many plan rows."""

    windows: object
    reference: list
    hessians: dict | None = None
    gptq_cache: dict = field(default_factory=dict)
    calib_windows: object = None  # sequential GPTQ


def plan_row(loaded, the_plan: Plan, bench: EvalBench, progress: bool, desc: str,
             others: dict[str, EvalBench] | None = None) -> dict:
    """Quantize per the plan in memory, evaluate (also on ``others``, by name), restore; sizes and timings."""
    from bitalloc.quantizers.apply import quantize_model, restored

    t0 = time.perf_counter()
    with restored(loaded.model):
        quantize_model(loaded.model, loaded.inventory, the_plan, hessians=bench.hessians, cache=bench.gptq_cache,
                       calib_windows=bench.calib_windows, progress=progress_bar(progress and the_plan.sequential),
                       importance=loaded.importance)
        t_quant = time.perf_counter() - t0
        result = evaluate_windows(loaded.model, bench.windows, bench.reference, progress=progress_bar(progress), desc=desc)
        other = {k: evaluate_windows(loaded.model, b.windows, b.reference).to_dict() for k, b in (others or {}).items()}
    sizes = the_plan.sizes(loaded.inventory)
    return {
        **result.to_dict(),
        **({"provenance": the_plan.provenance.to_dict()} if the_plan.provenance.to_dict() else {}),
        **({"other_texts": other} if other else {}),
        "bpw": sizes.quantized_bpw, "code_bpw": sizes.code_bpw, "model_bpw": sizes.model_bpw,
        "model_mb": sizes.model_bytes / 1e6, "objective": the_plan.objective,
        "options_used": sorted({o.name for o in the_plan.assignment.values()}),
        "quantize_s": t_quant, "seconds": time.perf_counter() - t0,
    }


def reference_block(loaded, eval_settings: EvalSettings, text_path: str | None, keep_bits: int,
                    progress: bool, encoding: str = "utf-8") -> tuple[dict, EvalBench]:
    text, label = eval_text(text_path, encoding)
    if loaded.tokenizer is None:
        raise BitallocError(f"{loaded.source.label} has no tokenizer files; evaluation on text needs one.")
    windows = token_windows(loaded.tokenizer, text, eval_settings)
    reference = reference_logprobs(loaded.model, windows, progress=progress_bar(progress))
    inv = loaded.inventory
    block = {
        "model": loaded.source.label,
        "model_note": "the reference is the model as loaded; for the embedded default its weights already sit on a "
                      "4-bit grid (Q4_1 GGUF), not an fp16 original",
        "text": label,
        "eval": eval_settings.to_dict(),
        "units": len(inv.units),
        "quantized_numel": inv.quantized_numel,
        "kept_numel": inv.kept_numel,
        "bpw_note": "bpw: stored bits of the quantized units (codes + fp16 scales + fp16 zeros) / their weights; "
                    "code_bpw: codes only; model_bpw and model_mb: whole model, kept tensors (embeddings, norms) "
                    f"at {keep_bits} bits, tied tensors once",
        "reference": {**reference_result(windows, reference).to_dict(),
                      "model_mb": (inv.quantized_numel + inv.kept_numel) * 2 / 1e6, "model_mb_note": "at fp16"},
    }
    return block, EvalBench(windows, reference)


def evaluate_in_llamacpp(gguf: str, *, reference_model: str | None = None, text_path: str | None = None,
                         settings: EvalSettings | None = None, progress: bool = True,
                         encoding: str = "utf-8") -> dict:
    """Perplexity of a GGUF file run by llama.cpp itself; with
    ``reference_model``, KL and top-1 against it: a .gguf reference runs in
    llama.cpp too (same runtime on both sides), anything else in transformers."""
    from bitalloc.evaluate import window_logprobs
    from bitalloc.evaluate.llamacpp import LlamaCpp
    from bitalloc.model.loading import load_model, load_tokenizer, resolve_source

    settings = settings or EvalSettings()
    text, label = eval_text(text_path, encoding)
    source = resolve_source(gguf)
    tok = load_tokenizer(source)
    if tok is None:
        raise BitallocError(f"{gguf} holds no tokenizer that transformers can read; it cannot be evaluated on text.")
    windows = token_windows(tok, text, settings)
    with LlamaCpp(progress=progress_bar(progress)) as runner:
        reference = None
        if reference_model is not None:
            ref_source = resolve_source(reference_model or None)
            if ref_source.gguf_file:
                reference = runner.logprobs(f"{ref_source.path}/{ref_source.gguf_file}", windows, desc="reference")
            else:
                ref_model, _ = load_model(ref_source)
                logprobs = (window_logprobs(ref_model, row) for row in _iter(windows, progress, "reference"))
                reference = runner.store(logprobs, windows, "transformers")
        result = runner.evaluate(f"{source.path}/{source.gguf_file}", windows, reference)
        notices = list(runner.notices)
    return {"model": source.label, "runtime": "llama.cpp", "reference_runtime": reference and reference.runtime,
            "text": label, "settings": settings.to_dict(), "result": result.to_dict(), "notices": notices}


def _iter(items, progress: bool, desc: str):
    bar = progress_bar(progress)
    return bar(list(items), desc=desc, unit="window") if bar else items
