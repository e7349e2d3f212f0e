"""The block-local kl scorer against computations from scratch on a tiny
random Llama: its probes are the change of the unit's block output (full
forwards with a hook), its anchors' entries the end-to-end KL, and every other
unit's entry its block error times the KL per block error interpolated over
depth between the anchor layers."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.calib.grams import CalibSettings
from bitalloc.evaluate import EvalSettings, evaluate, reference_logprobs, token_windows
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import get_weight, layer_index, set_weight
from bitalloc.scorers import ScorerSettings, score
from bitalloc.scorers.probes import anchor_layers, depth_ratios
from bitalloc.solve.problem import Budget

SETTINGS = api.PlanSettings(Budget(3.5), calib=CalibSettings(2, 64),
                            scorer_settings=ScorerSettings(probe_windows=2, probe_seq_len=48, kl_anchors=2))
OPTION = QuantOption(3, 64)  # one of the integer menu's probe options


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    import os

    from conftest import char_tokenizer, tiny_llama

    old = os.environ.get("BITALLOC_CACHE")
    os.environ["BITALLOC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_llama(num_hidden_layers=4, initializer_range=0.15).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    c = api.scoring_context(api.load(str(path)), SETTINGS, progress=False)
    c.path = str(path)
    yield c
    if old is None:
        os.environ.pop("BITALLOC_CACHE")
    else:
        os.environ["BITALLOC_CACHE"] = old


def _windows(ctx):
    s = ctx.settings
    return token_windows(ctx.tokenizer, ctx.calib_text, EvalSettings(s.probe_seq_len, s.probe_windows))


def _replaced(ctx, unit, W_new, run):
    W = get_weight(ctx.model, unit)
    set_weight(ctx.model, unit, W_new)
    try:
        return run()
    finally:
        set_weight(ctx.model, unit, W)


@torch.no_grad()
def _block_out(ctx, index: int) -> torch.Tensor:
    """Block ``index``'s output in a full forward of the whole model."""
    kept = {}
    block = ctx.model.model.layers[index]
    handle = block.register_forward_hook(lambda _m, _a, out: kept.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        ctx.model(_windows(ctx))
    finally:
        handle.remove()
    return kept["out"].double()


def _block_error(ctx, i: int, option: QuantOption = OPTION) -> float:
    unit = ctx.inventory.units[i]
    index = layer_index(unit.name)
    before = _block_out(ctx, index)
    after = _replaced(ctx, unit, ctx.probe_weight(unit, get_weight(ctx.model, unit), option),
                      lambda: _block_out(ctx, index))
    return float(((after - before) ** 2).sum()) / (before.shape[0] * before.shape[1])


def _kl(ctx, i: int, option: QuantOption = OPTION) -> float:
    unit = ctx.inventory.units[i]
    windows = _windows(ctx)
    ref = reference_logprobs(ctx.model, windows)
    Q = ctx.probe_weight(unit, get_weight(ctx.model, unit), option)
    return _replaced(ctx, unit, Q, lambda: evaluate(ctx.model, windows, ref).kl)


def test_anchor_layers_spread_over_the_depth():
    assert anchor_layers(range(28), 4) == [0, 9, 18, 27]
    assert anchor_layers([3, 1, 2, 1], 2) == [1, 3]
    assert anchor_layers([0, 1, 2], 5) == [0, 1, 2]


def test_depth_ratios_take_the_median_log_ratio_of_each_layer():
    kls = np.array([[2.0], [8.0], [32.0], [0.0], [1.0]])
    errs = np.array([[1.0], [1.0], [1.0], [1.0], [np.nan]])
    xs, ys = depth_ratios([0, 0, 0, 5, 5], kls, errs)  # layer 5: no usable pair (KL 0, error NaN)
    assert xs.tolist() == [0.0]
    assert ys == pytest.approx([np.log(8.0)])


def test_block_probe_is_the_change_of_the_units_block_output(ctx):
    for i in (0, 6, len(ctx.inventory.units) - 1):  # attention, MLP, the last block's down projection
        unit = ctx.inventory.units[i]
        got = ctx.block_error(i, ctx.probe_weight(unit, get_weight(ctx.model, unit), OPTION))
        assert got == pytest.approx(_block_error(ctx, i), rel=1e-5)
        assert got > 0


def test_kl_block_table_is_block_error_times_the_anchors_kl_per_error(ctx):
    table = score(ctx, ["kl-block"])["kl-block"]
    j = ctx.options.index(OPTION)
    probes = [QuantOption.parse(o) for o in ctx.settings.kl_probe_options]
    assert OPTION in probes
    units = ctx.inventory.units
    layers = [layer_index(u.name) for u in units]
    assert sorted(set(layers)) == [0, 1, 2, 3]  # kl_anchors=2: layers 0 and 3 anchor, 1 and 2 interpolated
    logs = {0: [], 3: []}  # log(KL / block error) over every unit and probe option of the layer
    for i, k in enumerate(layers):
        if k in logs:
            for option in probes:
                kl = _kl(ctx, i, option)
                if option == OPTION:
                    assert table.distortion[i, j] == pytest.approx(kl, rel=1e-5)  # an anchor keeps its KL
                logs[k].append(np.log(kl / _block_error(ctx, i, option)))
    y0, y3 = np.median(logs[0]), np.median(logs[3])
    for i, k in enumerate(layers):
        if k in (1, 2):
            factor = np.exp(y0 + (y3 - y0) * k / 3)
            assert table.distortion[i, j] == pytest.approx(factor * _block_error(ctx, i), rel=1e-5)


def test_kl_block_with_every_layer_an_anchor_is_the_kl_table(ctx):
    every = api.scoring_context(api.load(ctx.path), replace(
        SETTINGS, scorer_settings=replace(SETTINGS.scorer_settings, kl_anchors=4)), progress=False)
    tables = score(every, ["kl", "kl-block"])
    np.testing.assert_array_equal(tables["kl-block"].distortion, tables["kl"].distortion)
