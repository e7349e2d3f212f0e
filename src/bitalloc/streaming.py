"""What a model streamed from disk (``--stream``: the weights read tensor by
tensor, never all in memory) can be planned with: settings that need no
forward pass through the whole model."""

from __future__ import annotations

from dataclasses import replace

from bitalloc.errors import BitallocError
from bitalloc.quantizers import quantizer
from bitalloc.scorers import SCORERS


def check_streamable(settings):  # an api.PlanSettings; returned with the imatrix and the guard off
    """A streamed model is planned from its weights alone: a data-free
    scorer, RTN, no importance matrix, no guard or refinement (they run the
    model); anything else is refused by name."""
    if SCORERS[settings.scorer].calibrated:
        data_free = sorted(n for n, s in SCORERS.items() if not s.calibrated)
        raise BitallocError(f"--stream scores from the weights alone; the {settings.scorer} scorer needs calibration "
                            f"forwards through the whole model. Use one of {data_free}, or drop --stream.")
    if quantizer(settings.quantizer).calibrated:
        raise BitallocError(f"--stream quantizes without calibration; --quantizer {settings.quantizer} needs it. "
                            "Use --quantizer rtn, or drop --stream.")
    if settings.refine.rounds:
        raise BitallocError("--stream plans without forward passes; --refine-rounds needs them. Drop one of the two.")
    return replace(settings, menu=replace(settings.menu, imatrix=False), guard=False)
