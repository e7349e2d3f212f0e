"""The child side of ``bitalloc.evaluate.llamacpp``: llama.cpp runs here, in
a process of its own, so that a native crash inside it (an illegal
instruction, a segmentation fault, a failed ``GGML_ASSERT``) ends this
process and not bitalloc's, which reports it and keeps what it measured.

The parent sends requests over a ``multiprocessing`` pipe; each request
loads one GGUF file, decodes every window in one batch from an empty cache
at positions 0..T-1, and answers with per-window sums (or writes the
log-probabilities to a ``.npy`` file). After each window it sends a tick, so
the parent's progress bar moves. Imports only numpy, torch and llama_cpp.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Options:
    n_threads: int = 2
    extra_bufts: bool = True  # llama.cpp's extra buffer types: weight repacking and, where compiled, AMX
    cache_type_k: str = "f16"  # --cache-type-k: the type of the cached keys
    cache_type_v: str = "f16"  # --cache-type-v
    flash_attn: bool = False  # llama.cpp needs it for a quantized V cache


class RequestError(Exception):
    """A failure to report to the parent as one line (not a crash)."""


def _ggml_type(llama_cpp, name: str) -> int:
    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise RequestError(f"This llama.cpp has no cache type {name!r}.")
    return int(value)


class _Model:
    """One GGUF file loaded in llama.cpp with a context of ``n_ctx`` positions
    that outputs logits at every position."""

    def __init__(self, llama_cpp, path: str, n_ctx: int, options: Options):
        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = options.extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RequestError(f"llama.cpp could not load {path!r}. The file may lack metadata llama.cpp needs, or "
                               "use an architecture or type this llama.cpp lacks.")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = options.n_threads
        ctx_params.no_perf = True
        # flash attention off by default, as llama-cpp-python's Llama has it: attention in F32 over the F16
        # cache; the KV cache comparisons turn it on for every row (a quantized V cache requires it)
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn \
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx_params.type_k = _ggml_type(llama_cpp, options.cache_type_k)
        ctx_params.type_v = _ggml_type(llama_cpp, options.cache_type_v)
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RequestError(f"llama.cpp could not make a context of {n_ctx} positions for {path!r}.")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def logits(self, row: np.ndarray) -> np.ndarray:
        """(T, vocab) float32 logits of one window of T token ids, decoded in
        one batch from an empty cache."""
        lib, n = self.lib, len(row)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        self.batch.n_tokens = n
        for i, token in enumerate(row.tolist()):
            self.batch.token[i], self.batch.pos[i] = token, i
            self.batch.n_seq_id[i], self.batch.seq_id[i][0], self.batch.logits[i] = 1, 0, 1
        status = lib.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise RequestError(f"llama_decode returned {status}")
        return np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n * self.n_vocab,)) \
            .reshape(n, self.n_vocab).copy()

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _check_windows(windows: np.ndarray, n_vocab: int) -> None:
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise RequestError(f"The windows must be token ids of shape (windows, length >= 2). Got shape "
                           f"{tuple(windows.shape)} instead.")
    if int(windows.min()) < 0 or int(windows.max()) >= n_vocab:
        raise RequestError(f"The windows hold token ids in [{int(windows.min())}, {int(windows.max())}], but the "
                           f"GGUF model's vocabulary has {n_vocab} tokens. Tokenize with this model's tokenizer.")


def _window_logprobs(llama_cpp, conn, path: str, windows: np.ndarray, options: Options):
    """Yield (index, (T-1, vocab) float32 log-probs of the next token) per window, ticking after each."""
    import torch
    import torch.nn.functional as F

    model = _Model(llama_cpp, path, int(windows.shape[1]), options)
    try:
        _check_windows(windows, model.n_vocab)
        for i, row in enumerate(windows):
            logits = torch.from_numpy(model.logits(row)[:-1])  # (T-1, V)
            yield i, F.log_softmax(logits, dim=-1)
            conn.send(("tick",))
    finally:
        model.close()


def logprobs(llama_cpp, conn, path: str, windows: np.ndarray, out_path: str, options: Options) -> tuple:
    """Write every window's log-probs to ``out_path`` (.npy, (B, T-1, vocab) float32)."""
    out = None
    for i, logp in _window_logprobs(llama_cpp, conn, path, windows, options):
        if out is None:
            shape = (len(windows), logp.shape[0], logp.shape[1])
            out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape)
        out[i] = logp.numpy()
    out.flush()
    return tuple(out.shape)


def evaluate(llama_cpp, conn, path: str, windows: np.ndarray, reference_path: str | None, options: Options) -> dict:
    """Per-window sums: NLL of the next token; with the reference's stored
    log-probs also KL(reference || file) and top-1 agreement."""
    import torch

    reference = None if reference_path is None else np.load(reference_path, mmap_mode="r")  # (B, T-1, V)
    sums: dict[str, list] = {"tokens": [], "nll": [], "kl": [], "agree": []}
    for i, logp in _window_logprobs(llama_cpp, conn, path, windows, options):
        targets = torch.from_numpy(windows[i][1:].astype(np.int64))  # (T-1,)
        sums["nll"].append(float(-logp.gather(1, targets[:, None]).sum()))
        sums["tokens"].append(targets.numel())
        if reference is not None:
            ref = torch.from_numpy(np.array(reference[i]))  # (T-1, V)
            if ref.shape != logp.shape:
                raise RequestError(f"Reference log-probs of window {i} have shape {tuple(ref.shape)}; llama.cpp "
                                   f"gives {tuple(logp.shape)}. The reference must use the same windows and "
                                   "vocabulary.")
            sums["kl"].append(float((ref.exp() * (ref - logp)).sum()))
            sums["agree"].append(int((ref.argmax(-1) == logp.argmax(-1)).sum()))
    return sums


def quantize(llama_cpp, conn, source: str, out: str, ftype: str, vectors: dict, options: Options) -> None:
    """``llama_model_quantize`` of ``source`` to the preset ``ftype`` (e.g.
    "Q4_K_M") with the importance vectors (GGUF name -> (in,) float32) as its
    imatrix; on failure the tail of llama.cpp's log names the reason."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()  # a NULL name ends the list
    keep = []  # the arrays must outlive the call
    for entry, (name, v) in zip(entries, vectors.items()):
        v = np.ascontiguousarray(v, dtype=np.float32)
        keep.append((name.encode(), v))
        entry.name, entry.size, entry.data = keep[-1][0], v.size, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize, params.nthread = True, options.n_threads
    if vectors:
        params.imatrix = entries
    del _LOG[:]
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        tail = " ".join("".join(_LOG).split()[-40:])
        raise RequestError(f"llama.cpp could not make the {ftype} preset of {source}: {tail}")


HANDLERS = {"logprobs": logprobs, "evaluate": evaluate, "quantize": quantize}
_LOG: list[str] = []  # llama.cpp's log lines since the last request that reads them


def _silence(llama_cpp) -> object:
    """Keep llama.cpp's log lines to quote in an error instead of printing
    them; the callback object is returned so that it outlives the call."""
    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        _LOG.append(text.decode(errors="replace"))
        del _LOG[:-200]

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    return collect


def serve(conn) -> None:
    """Answer requests until the parent says stop or goes away: first
    ("ready", llama.cpp's system info), then per request ticks and one
    ("done", result) or ("error", message)."""
    import torch

    torch.set_num_threads(1)  # llama.cpp's own threads do the work; torch only sums
    try:
        import llama_cpp
    except ImportError as e:
        conn.send(("unavailable", str(e)))
        return
    keep = _silence(llama_cpp)  # noqa: F841  (the callback must stay alive)
    conn.send(("ready", llama_cpp.llama_print_system_info().decode(errors="replace")))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request[0] == "stop":
            return
        try:
            conn.send(("done", HANDLERS[request[0]](llama_cpp, conn, *request[1:])))
        except RequestError as e:
            conn.send(("error", str(e)))
        except Exception as e:  # anything else: one line for the parent, the child stays usable
            conn.send(("error", f"{e.__class__.__name__}: {e}"))


def main(argv: list[str]) -> None:
    """``python -m bitalloc.evaluate.llamacpp_child FD [module:function]``:
    serve on the socket of file descriptor FD (the parent's socket pair)."""
    import importlib
    from multiprocessing.connection import Connection

    conn = Connection(int(argv[0]))
    module, _, name = (argv[1] if len(argv) > 1 else f"{__name__}:serve").partition(":")
    getattr(importlib.import_module(module), name)(conn)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
