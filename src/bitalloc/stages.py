"""Wall time and peak resident memory of each stage of a long run.

Linux keeps a process's peak resident set (``VmHWM`` in ``/proc/PID/status``)
and resets it to the current resident set when ``5`` is written to
``/proc/PID/clear_refs``; a stage resets it at its start and reads it at its
end, so each stage reports its own peak, not the run's so far. Child
processes that do part of the work (llama.cpp runs in one) are measured the
same way when their pids are given. Elsewhere the peak is not measured
(``None``) rather than guessed."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """The process's peak resident set since its last reset, in MB (10^6
    bytes); None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 / 1e6 if found else None


def reset_peak(pid: int | str = "self") -> bool:
    """Reset the process's peak resident set to its current one; False where
    the system does not allow it (the peak then covers earlier stages too)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stages:
    """Seconds and peak resident memory (MB) per named stage, in the order
    run; ``with stages("sweep"):`` measures one. ``children()`` gives the pids
    of helper processes whose peak is reported beside the stage's own."""

    def __init__(self, children: Callable[[], list[int]] = list):
        self.rows: dict[str, dict] = {}
        self.children = children

    @contextmanager
    def __call__(self, name: str, **extra) -> Iterator[dict]:
        pids = [p for p in self.children() if p]
        exact = all([reset_peak(), *(reset_peak(p) for p in pids)])
        row: dict = {"seconds": None, "peak_rss_mb": None, **extra}
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 2)
            row["peak_rss_mb"] = _round(peak_rss_mb())
            pids = [p for p in self.children() if p]  # a helper started during the stage counts from its start
            if pids:
                row["helper_peak_rss_mb"] = _round(max((peak_rss_mb(p) or 0.0) for p in pids))
            if not exact:
                row["peak_note"] = "peak since the process started (it could not be reset)"
            self.rows[name] = row

    def to_dict(self) -> dict:
        return dict(self.rows)


def _round(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)


STAGE_HEADERS = ("stage", "seconds", "per unit", "peak RSS MB", "llama.cpp child peak MB")


def stage_rows(rows: dict) -> list[list[str]]:
    """The stages as table rows (``STAGE_HEADERS``): seconds, seconds per
    unit where the stage measured units, the peak resident memory of
    bitalloc's process and of its helper (llama.cpp's child) where there is one."""
    out = []
    for name, r in rows.items():
        per = f"{r['seconds'] / r['units']:.2f} s x {r['units']}" if r.get("units") and r.get("seconds") else ""
        out.append([name, f"{r.get('seconds') or 0:.1f}", per, _text(r.get("peak_rss_mb")),
                    _text(r.get("helper_peak_rss_mb"))])
    return out


def _text(mb: float | None) -> str:
    return "" if mb is None else f"{mb:,.0f}"
