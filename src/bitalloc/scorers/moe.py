"""Mixture-of-Experts scorers: MC-MoE's pre-loading mixed precision (PMQ).

PMQ weighs each expert's quantization loss by how much the router uses it:
importance = f^a * w^b, with f the share of calibration tokens routed to the
expert and w the mean routing weight it receives when routed; the loss is the
expert's output error tr(dW H dW^T), H from only its routed tokens (so it is
per routed token; f turns it into a per-token figure). Dense units (attention,
shared experts, dense layers) process every token with weight 1: importance 1.
An expert no calibration token reached gets importance 0, as in PMQ: the
solver gives it the fewest bits (the report lists such experts).
"""

from __future__ import annotations

import numpy as np

from bitalloc.scorers.context import ScoringContext, make_table
from bitalloc.table import ErrorTable

PMQ_FREQUENCY_EXPONENT = 1.0  # a
PMQ_WEIGHT_EXPONENT = 1.0  # b


def routing_importance(units, routing: dict[str, dict], a: float = PMQ_FREQUENCY_EXPONENT,
                       b: float = PMQ_WEIGHT_EXPONENT) -> np.ndarray:
    """(units,) f^a * w^b for expert slices, 1 for every other unit."""
    out = np.ones(len(units))
    for i, u in enumerate(units):
        if u.index is None:
            continue
        r = routing.get(u.param.rsplit(".", 1)[0])
        routed = r["routed"][u.index] if r else 0
        if not r or r["tokens"] == 0 or routed == 0:
            out[i] = 0.0
            continue
        f = routed / r["tokens"]
        w = r["mass"][u.index] / routed
        out[i] = f**a * w**b
    return out


def score_pmq(ctx: ScoringContext, name: str) -> ErrorTable:
    output = ctx.reductions(["output"])["output"]
    return make_table(ctx, name, output, routing_importance(ctx.inventory.units, ctx.routing))
