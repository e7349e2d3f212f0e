"""The weight-error sweep as Ray tasks: ``plan --stream --ray [ADDRESS]``.

Each worker is a Ray actor that builds the model's skeleton and opens its
weights on disk itself (``model.source``), once, sets its own torch threads
(two torch processes on 2 cores that each take both cores slow each other
several times over), and measures the rows of the units it is handed: the
same ``ScoringContext._unit_errors`` the single process runs, whose sums do
not depend on the thread count (``units.stable_sum``), so the table is the
same bit for bit. The model never travels: only unit descriptions go out
and rows of numbers come back. On a real cluster every node must see the
checkpoint at the same path (a shared file system).

Ray is an optional extra: ``pip install 'bitalloc[ray]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from bitalloc.errors import BitallocError
from bitalloc.formats.affine import QuantOption
from bitalloc.model.loading import ModelSource
from bitalloc.model.units import Unit


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local cluster; "auto" or "host:port": join one
    workers: int = 2  # actors, each with its own reader of the weights
    threads: int = 1  # torch threads (and Ray CPUs) per worker

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1:
            raise BitallocError(f"--ray-workers and --ray-threads must be at least 1. Got {self.workers} and "
                                f"{self.threads} instead.")

    def to_dict(self) -> dict:
        return {"address": self.address or "local", "workers": self.workers, "threads": self.threads}


def import_ray():
    try:
        import ray
    except ImportError:
        raise BitallocError("--ray needs the package ray: pip install 'bitalloc[ray]' (or pip install ray).") from None
    return ray


class SweepWorker:
    """One Ray actor: the model's weights opened from disk once, rows measured on request."""

    def __init__(self, source: ModelSource, options: Sequence[QuantOption], allow_ragged: bool, threads: int):
        import torch

        from bitalloc.model.source import open_source, skeleton
        from bitalloc.scorers.context import ScoringContext

        torch.set_num_threads(threads)
        model = skeleton(source)
        weights = open_source(source, model)
        self.ctx = ScoringContext(model, None, None, options, allow_ragged=allow_ragged, weights=weights.weight)

    def rows(self, unit: Unit, kinds: list[str]) -> tuple[str, dict[str, list[float]], float, int]:
        import os

        rows = self.ctx._unit_errors(unit, kinds)
        return unit.name, rows, self.ctx._norms_seen.pop(unit.name), os.getpid()


def ray_runner(source: ModelSource, settings: RaySettings) -> Callable:
    """``runner(units, kinds, options, allow_ragged)`` -> (unit name, rows, ||W||^2) as the workers finish them;
    ``runner.pids``: the worker processes that measured them."""

    def run(units: Sequence[Unit], kinds: list[str], options: Sequence[QuantOption],
            allow_ragged: bool) -> Iterator[tuple[str, dict[str, list[float]], float]]:
        ray = import_ray()
        from ray.util import ActorPool

        started = not ray.is_initialized()
        if started:
            local = settings.address is None
            ray.init(address=settings.address, num_cpus=settings.workers * settings.threads if local else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        actor = ray.remote(num_cpus=settings.threads)(SweepWorker)
        workers = [actor.remote(source, tuple(options), allow_ragged, settings.threads)
                   for _ in range(settings.workers)]
        try:
            pool = ActorPool(workers)
            for name, rows, norm2, pid in pool.map_unordered(lambda w, unit: w.rows.remote(unit, kinds), list(units)):
                run.pids.add(pid)
                yield name, rows, norm2
        except ray.exceptions.RayTaskError as e:  # a worker's BitallocError (NaN weights, a damaged file) as itself
            cause = getattr(e, "cause", None)
            if isinstance(cause, BitallocError):
                raise cause from None
            raise
        finally:
            for w in workers:
                ray.kill(w)
            if started:
                ray.shutdown()

    run.pids = set()
    return run
