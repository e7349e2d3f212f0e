"""Run a bitalloc command under a memory cap: ``python capped.py MB args...``.

The heavy libraries are imported first; then the address space the process
may still add is limited to MB megabytes (``RLIMIT_AS``) and the command
runs. Run it with MALLOC_ARENA_MAX=1 (glibc reserves an arena per thread
otherwise), so that what the cap limits is the data the command holds, not
per-thread reservations. Prints the peak resident memory above the start (VmHWM after
the imports, from /proc) to stderr as ``capped: peak MB``."""

import resource
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> int:
    cap_mb, args = float(sys.argv[1]), sys.argv[2:]
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.optimize  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import bitalloc.api  # noqa: F401  (the code every command runs, loaded before the cap)
    import bitalloc.export.native  # noqa: F401
    import bitalloc.model.source  # noqa: F401
    import bitalloc.scorers  # noqa: F401
    import bitalloc.solve.solvers  # noqa: F401
    from bitalloc.cli import build_parser
    from bitalloc.cli import main as cli_main

    build_parser()

    torch.ones(1 << 16).sum()  # torch's thread pool (OMP_NUM_THREADS) exists before the cap
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    start_rss = _status("VmRSS")
    limit = _status("VmSize") + int(cap_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        code = cli_main(args)
    except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError
        if not isinstance(e, MemoryError) and "allocate" not in str(e) and "mmap" not in str(e):
            raise
        print(f"capped: out of memory ({e.__class__.__name__})", file=sys.stderr)
        code = 3
    peak = (_status("VmHWM") - start_rss) / 2**20
    grown = (_status("VmPeak") - limit) / 2**20 + cap_mb
    print(f"capped: peak resident {peak:.1f} MB above the start; peak address space {grown:.1f} MB above the start, "
          f"cap {cap_mb:g} MB", file=sys.stderr)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
