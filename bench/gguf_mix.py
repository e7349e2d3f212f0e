"""llama.cpp's presets against a bitalloc mix of GGUF types at the same size,
both measured by llama.cpp itself.

1. Importance matrix: mean squared input activation per column of every
   linear (from bitalloc's calibration Gram matrices, calibration half of the
   offline text), under GGUF names; token frequencies for the embedding.
2. Presets: `llama_model_quantize` from the source GGUF (allow_requantize;
   the source is SmolLM2's Q4_1, so "reference" is that file), with the same
   importance vectors; the exact bytes of tensor data.
3. bitalloc: every weight tensor of the GGUF (token embedding included) is a
   unit; its options are the GGUF types whose block fits its rows, quantized
   by ggml with the same importance; the error table is the importance-
   weighted squared error sum_j imp_j sum_i (W - Q)_ij^2 (the expected squared
   output error of a linear under a diagonal input covariance; for the
   embedding, rows weighted by token frequency); the exact ILP picks one type
   per tensor within each preset's tensor-data bytes; `write_gguf` writes it.
4. Every file runs in llama.cpp on the same windows of the evaluation half;
   KL and top-1 against the source GGUF run in llama.cpp.

    .venv/bin/python bench/gguf_mix.py --out bench/gguf-mix-smollm2.json
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np

from bitalloc import api
from bitalloc.calib import CalibSettings, cached_hessians
from bitalloc.evaluate import EvalSettings, token_windows
from bitalloc.evaluate.llamacpp import evaluate_gguf, llamacpp_logprobs
from bitalloc.export.gguf import hf_to_gguf_names, write_gguf
from bitalloc.fileio import write_json
from bitalloc.formats.gguf_types import GGUFType, gguf_types
from bitalloc.report import with_ci
from bitalloc.solvers import solve_ilp
from bitalloc.text import calibration_text

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
# Q4_1 is left out: the only source offline is SmolLM2's Q4_1 file, which Q4_1 re-stores without any error,
# an advantage no fp16 source would give it (the presets requantize every tensor from that file too)
MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_S")


def importance(loaded, calib: CalibSettings) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(GGUF name -> mean squared input per column, token frequencies)."""
    text = calibration_text(None)
    H = cached_hessians(loaded.model, loaded.inventory, loaded.tokenizer, text, calib)
    names = hf_to_gguf_names([u.name for u in loaded.inventory.units], n_blocks=loaded.model.config.num_hidden_layers)
    vectors = {names[u]: (np.diag(h.double().numpy()) / 2).astype(np.float32) for u, h in H.items()}  # H = 2X^TX/n
    ids = np.array(loaded.tokenizer(text[:2_000_000]).input_ids)
    freq = np.bincount(ids, minlength=loaded.model.config.vocab_size).astype(np.float64)
    return vectors, freq / freq.sum()


def error_table(reader, vectors, freq) -> tuple[list[str], list[tuple], np.ndarray, np.ndarray]:
    """Units (GGUF weight tensors), their shapes, cost (bits) and error per menu type."""
    from gguf.quants import dequantize

    menu = [t for t in gguf_types() if t.name in MENU]
    names, shapes, cost, err = [], [], [], []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        W = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])).astype(np.float32)
        rows, cols = W.shape
        weight = freq[:rows, None] if t.name == "token_embd.weight" else None
        imp = vectors.get(t.name)
        c, e = [], []
        for f in menu:
            if not f.available(W.shape):
                c.append(-1), e.append(np.inf)
                continue
            Q = f.dequantize(f.quantize(W, imp if f.uses_importance else None))
            d2 = (W - Q).astype(np.float64) ** 2  # (rows, cols)
            e.append(float((d2 * weight).sum()) if weight is not None else float((d2.sum(0) * imp).sum()))
            c.append(f.storage_bits(W.shape))
        names.append(t.name), shapes.append(W.shape), cost.append(c), err.append(e)
    return names, [f.name for f in menu], np.array(cost, dtype=np.int64), np.array(err)


def preset(source: str, out: str, name: str, vectors: dict[str, np.ndarray]) -> None:
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()  # a NULL name ends the list
    keep = []
    for e, (n, v) in zip(entries, vectors.items()):
        v = np.ascontiguousarray(v, dtype=np.float32)
        keep.append(v)
        e.name, e.size, e.data = n.encode(), v.size, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.allow_requantize, params.nthread, params.imatrix = True, 2, entries
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {name}")


def tensor_bytes(path: str) -> dict[str, int]:
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default="out/gguf-mix")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from gguf import GGUFReader

    t0 = time.perf_counter()
    loaded = api.load(None)
    src = f"{loaded.source.path}/{loaded.source.gguf_file}"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    vectors, freq = importance(loaded, CalibSettings())
    reader = GGUFReader(src)
    names, menu, cost, err = error_table(reader, vectors, freq)
    seconds = {"importance + table": time.perf_counter() - t0}
    windows = token_windows(loaded.tokenizer, api.eval_text(None)[0], EvalSettings(a.seq_len, a.windows))
    ref = llamacpp_logprobs(src, windows)
    src_bytes = tensor_bytes(src)
    report = {"source": src, "menu": menu, "windows": a.windows, "seq_len": a.seq_len, "rows": [], "seconds": seconds,
              "note": "reference = the source Q4_1 GGUF run in llama.cpp; sizes are tensor data bytes"}
    weights = [n for n in names]
    for name in a.presets.split(","):
        path = str(work / f"preset-{name}.gguf")
        preset(src, path, name, vectors)
        pb = tensor_bytes(path)
        budget_bits = 8 * sum(pb[n] for n in weights)
        other = sum(v for n, v in pb.items() if n not in weights)  # norms: F32 in both files
        allowed = cost >= 0
        sol = solve_ilp(np.where(allowed, cost, 0), np.where(allowed, err, 0.0), allowed, budget_bits)
        types = {n: menu[int(j)] for n, j in zip(names, sol.choice)}
        mix = str(work / f"bitalloc-{name}.gguf")
        info = write_gguf(src, mix, types, importance={n: v for n, v in vectors.items()
                                                      if GGUFType(types[n]).uses_importance})
        for label, path_, size in ((f"preset {name}", path, sum(pb.values())),
                                   (f"bitalloc @ {name}", mix, info["tensor_data_bytes"])):
            r = evaluate_gguf(path_, windows, ref).to_dict()
            r.update(method=label, file=path_, tensor_bytes=size, file_bytes=Path(path_).stat().st_size,
                     budget=name, weight_bits=budget_bits, other_bytes=other)
            report["rows"].append(r)
            print(f"{label:22s} {size / 1e6:8.3f} MB  ppl {with_ci(r, 'ppl')}  KL {with_ci(r, 'kl', 4)}  "
                  f"top-1 {with_ci(r, 'top1')}", flush=True)
        report["rows"][-1]["types"] = {t: sum(1 for v in types.values() if v == t) for t in set(types.values())}
        write_json(a.out, report)
    report["seconds"]["total"] = time.perf_counter() - t0
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
