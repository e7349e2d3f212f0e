"""Entry points for llama.cpp's child process that misbehave on purpose
(``LlamaCpp(serve="llamacpp_faults:NAME")``): a native crash is simulated by
the child killing itself with the signal a crash would raise, before the
real handler runs."""

from __future__ import annotations

import os
import signal


def _serve_with(conn, before, system_info_extra: bytes = b"") -> None:
    import llama_cpp

    from bitalloc.evaluate import llamacpp_child as child

    info = llama_cpp.llama_print_system_info
    llama_cpp.llama_print_system_info = lambda: info() + system_info_extra

    def wrap(handler):
        def run(lib, conn, path, windows, *rest):
            before(path, rest[-1])  # rest[-1]: the request's Options
            return handler(lib, conn, path, windows, *rest)
        return run

    child.HANDLERS = {k: wrap(v) for k, v in child.HANDLERS.items()}
    child.serve(conn)


def segfault_on_marked(conn) -> None:
    """SIGSEGV on any file whose name holds 'crash'."""
    def before(path, options):
        if "crash" in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGSEGV)
    _serve_with(conn, before)


def segfault_on_bitalloc_files(conn) -> None:
    """SIGSEGV on the files bitalloc wrote (``bitalloc-*.gguf``), not on presets or the source."""
    def before(path, options):
        if os.path.basename(path).startswith("bitalloc-"):
            os.kill(os.getpid(), signal.SIGSEGV)
    _serve_with(conn, before)


def sigill_with_amx(conn) -> None:
    """A library built with AMX on a CPU that traps it: SIGILL while extra buffer types are on."""
    def before(path, options):
        if options.extra_bufts:
            os.kill(os.getpid(), signal.SIGILL)
    _serve_with(conn, before, b" AMX_INT8 = 1 |")


def sigill_always(conn) -> None:
    """An instruction the CPU lacks, without AMX to blame: no retry helps."""
    def before(path, options):
        os.kill(os.getpid(), signal.SIGILL)
    _serve_with(conn, before)
