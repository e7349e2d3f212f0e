"""Each scorer against an independent computation on a tiny random Llama."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.calib.grams import CalibSettings
from bitalloc.compare.integer import CompareSettings, compare, correlations, figure, write_outputs
from bitalloc.evaluate import EvalSettings
from bitalloc.formats.affine import QuantOption
from bitalloc.solve.problem import Budget
from bitalloc.formats.affine_rtn import fake_quantize
from bitalloc.scorers import SCORERS, ScorerSettings, score
from bitalloc.model.units import get_weight

SETTINGS = api.PlanSettings(Budget(3.5), calib=CalibSettings(4, 64),
                            scorer_settings=ScorerSettings(probe_windows=1, probe_seq_len=48, taylor_windows=2))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    import os

    from conftest import char_tokenizer, tiny_llama

    os.environ["BITALLOC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_llama(num_hidden_layers=3).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    loaded = api.load(str(path))
    c = api.scoring_context(loaded, SETTINGS, progress=False)
    c.loaded = loaded
    yield c
    os.environ.pop("BITALLOC_CACHE")


@pytest.fixture(scope="module")
def tables(ctx):
    return score(ctx, list(SCORERS))


def test_every_scorer_fills_a_finite_non_negative_table(tables, ctx):
    for name, t in tables.items():
        assert t.unit_names == tuple(u.name for u in ctx.inventory.units), name
        e = t.errors[:, : len(ctx.options)]
        assert np.isfinite(e).all() and (e >= 0).all(), name
        # more bits at the same layout never costs more (except data-free alpha ties)
        col = {o: j for j, o in enumerate(t.options)}
        lo, hi = col[QuantOption(2, 32)], col[QuantOption(8, 32)]
        assert (t.errors[:, lo] >= t.errors[:, hi]).all(), name


def test_output_and_hessian_match_direct_formulas(tables, ctx):
    unit = ctx.inventory.units[4]
    opt = QuantOption(3, 32)
    j = ctx.options.index(opt)
    W = get_weight(ctx.model, unit)
    H = ctx.hessians[unit.name].double()
    dW = (W - fake_quantize(W, opt)).double()
    assert tables["output"].distortion[4, j] == pytest.approx(float(torch.trace(dW @ H @ dW.T)), rel=1e-5)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    obs = 0.5 * float(((dW**2) / torch.diag(U) ** 2).sum())
    assert tables["hessian"].distortion[4, j] == pytest.approx(obs, rel=1e-5)


def _direct_kl(ctx, unit, W_new) -> float:
    """KL of the model with one weight replaced, computed from scratch: the
    reference's log-probs from the untouched model, full forwards."""
    from bitalloc.evaluate import evaluate, reference_logprobs, token_windows
    from bitalloc.model.units import set_weight

    s = ctx.settings
    windows = token_windows(ctx.tokenizer, ctx.calib_text, EvalSettings(s.probe_seq_len, s.probe_windows))
    W = get_weight(ctx.model, unit)
    ref = reference_logprobs(ctx.model, windows)
    set_weight(ctx.model, unit, W_new)
    try:
        return evaluate(ctx.model, windows, ref).kl
    finally:
        set_weight(ctx.model, unit, W)


def test_kl_scorer_measures_the_unit_alone(tables, ctx):
    for i, bits in ((0, 2), (2, 3), (len(ctx.inventory.units) - 1, 4)):  # the first unit probed, too
        unit = ctx.inventory.units[i]
        opt = QuantOption(bits, 64)
        W = get_weight(ctx.model, unit)
        expected = _direct_kl(ctx, unit, fake_quantize(W, opt))
        assert tables["kl"].distortion[i, ctx.options.index(opt)] == pytest.approx(expected, rel=1e-4)
        assert torch.equal(get_weight(ctx.model, unit), W)  # restored


def test_taylor_matches_autograd(tables, ctx):
    unit = ctx.inventory.units[0]
    opt = QuantOption(2, 64)
    g = ctx.gradients[unit.name]
    W = get_weight(ctx.model, unit)
    expected = float((g * (W - fake_quantize(W, opt))).abs().sum())
    assert tables["taylor"].distortion[0, ctx.options.index(opt)] == pytest.approx(expected, rel=1e-5)
    assert float(g.abs().sum()) > 0


def test_linearity_slope_is_the_fit_of_kl_measured_by_whole_forwards(ctx):
    """importance[u] = sum_r r*KL(r) / sum_r r^2 over the noise levels, where
    KL(r) is measured here by whole-model forwards in float64 with the unit's
    weight plus the scorer's seeded noise (||noise|| = ||W||) scaled by
    sqrt(r): the scorer measures from the probed block on (tail-only
    forwards, float32). Noise levels large enough that float32 rounding of
    the logits (about 1e-9 nats of KL on this tiny model) does not decide."""
    from dataclasses import replace

    import torch.nn.functional as F

    from bitalloc.model.units import set_weight

    settings = replace(SETTINGS, scorer_settings=ScorerSettings(noise_levels=(0.25, 1.0)))
    loud = api.scoring_context(ctx.loaded, settings, progress=False)
    table = score(loud, ["linearity"])["linearity"]
    levels = np.array(loud.settings.noise_levels)
    windows = loud.probe.windows
    with torch.no_grad():
        ref = F.log_softmax(loud.model(windows).logits[:, :-1].double(), dim=-1)
    for i in (1, len(loud.inventory.units) - 1):  # a unit in the first block, one in the last
        unit = loud.inventory.units[i]
        W = get_weight(loud.model, unit).clone()
        g = torch.Generator().manual_seed(loud.settings.seed * 100_003 + i)
        noise = torch.randn(W.shape, generator=g)
        noise *= (W.double().pow(2).sum() / noise.double().pow(2).sum()).sqrt().float()
        kls = []
        for r in levels:
            set_weight(loud.model, unit, W + float(np.sqrt(r)) * noise)
            with torch.no_grad():
                logp = F.log_softmax(loud.model(windows).logits[:, :-1].double(), dim=-1)
            kls.append(float((ref.exp() * (ref - logp)).sum()) / (ref.shape[0] * ref.shape[1]))
        set_weight(loud.model, unit, W)
        slope = float(np.dot(levels, kls) / np.dot(levels, levels))
        assert slope > 1e-7 and table.importance[i] == pytest.approx(slope, rel=2e-2), unit.name


def test_correlations_are_spearman_by_hand(ctx):
    """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) over the units where both tables are
    finite, at the one option asked for; the kl table is the measure."""
    from bitalloc.table import ErrorTable

    names = tuple(f"u{i}" for i in range(6))
    options = (QuantOption(3, 64), QuantOption(4, 64))

    def table(scorer, at3):
        distortion = np.stack([np.array(at3, dtype=float), np.arange(6, dtype=float)], axis=1)  # (units, options)
        return ErrorTable(scorer, "m", names, options, distortion, np.ones(6))

    kl = table("kl", [1, 2, 3, 4, 5, 6])
    same_order = table("a", [10, 20, 30, 40, 50, 600])
    reversed_ = table("b", [6, 5, 4, 3, 2, 1])
    swapped = table("c", [2, 1, 3, 4, 6, 5])  # d = (1, 1, 0, 0, 1, 1): rho = 1 - 6*4/(6*35)
    with_nan = table("d", [np.nan, 1, 2, 3, 5, 4])  # u0 left out: ranks over 5, d = (0,0,0,1,1): 1 - 6*2/(5*24)
    rho = correlations({"kl": kl, "a": same_order, "b": reversed_, "c": swapped, "d": with_nan}, options[0])
    assert rho["a"] == pytest.approx(1.0) and rho["b"] == pytest.approx(-1.0)
    assert rho["c"] == pytest.approx(1 - 6 * 4 / (6 * 35)) and rho["d"] == pytest.approx(1 - 6 * 2 / (5 * 24))
    assert correlations({"a": same_order}, options[0]) == {}  # nothing to correlate with


def test_llama_rule_plan_promotes_attn_v_and_ffn_down(ctx):
    inv = ctx.loaded.inventory
    s = api.PlanSettings(Budget(4.0))
    p = api.llama_rule_plan(inv, ctx.options, s, "tiny")
    assert p.sizes(inv).quantized_bpw <= 4.0
    promoted = set(inv.more_bits)
    assert promoted == {"model.layers.2.self_attn.v_proj", "model.layers.2.mlp.down_proj"}  # 3 layers: the last
    base = {p.assignment[u.name].bits for u in inv.units if u.name not in promoted}
    assert len(base) == 1 and all(p.assignment[n].bits >= min(base) + 2 for n in promoted)


def test_compare_writes_table_plot_and_correlations(ctx, tmp_path):
    settings = CompareSettings(budgets=(3.5,), scorers=("rtn-mse", "output", "kl"), quantizers=("rtn", "gptq"),
                               eval=EvalSettings(seq_len=48, windows=1))
    report = compare(ctx.loaded, settings, SETTINGS, progress=False)
    methods = {(r["quantizer"], r["method"]) for r in report["rows"]}
    assert ("gptq", "uniform") in methods and ("rtn", "kl") in methods and len(report["rows"]) == 2 * 5
    assert all(r["bpw"] <= 3.5 for r in report["rows"])
    assert set(report["spearman_vs_kl"]) == {"rtn-mse", "output"}
    stages = report["stages"]  # the sweep once, then each table, the reference and every row, in the order run
    assert list(stages)[:6] == ["importance matrix and menu", "weight-error sweep", "table rtn-mse", "table output",
                                "table kl", "reference"]
    assert len(stages) == 6 + len(report["rows"]) and all(r["seconds"] >= 0 for r in stages.values())
    assert stages["weight-error sweep"]["units"] == len(ctx.loaded.inventory.units)
    paths = write_outputs(report, str(tmp_path))
    # the plot shows the report: one panel per quantizer, one line per method through its (bpw, ppl) points,
    # the reference's perplexity as a horizontal line; the PNG is that figure at 110 dpi
    import matplotlib.image

    fig = figure(report)
    assert [ax.get_title() for ax in fig.axes] == ["RTN: perplexity vs size", "GPTQ: perplexity vs size"]
    for ax, q in zip(fig.axes, ("rtn", "gptq")):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {r["method"] for r in report["rows"]} | {"reference"}
        for method, ln in lines.items():
            if method == "reference":
                assert set(ln.get_ydata()) == {report["reference"]["ppl"]}
                continue
            want = sorted((r["bpw"], r["ppl"]) for r in report["rows"] if r["quantizer"] == q and r["method"] == method)
            assert list(zip(ln.get_xdata(), ln.get_ydata())) == want
    image = matplotlib.image.imread(paths[2])
    assert image.shape[:2] == (round(5.5 * 110), round(2 * 6.5 * 110))


def test_only_one_shot_calibrated_quantizers_gather_every_units_gram():
    from bitalloc.quantizers import gathers_every_gram

    assert gathers_every_gram("gptq", sequential=False)
    assert not gathers_every_gram("gptq", sequential=True)  # a block's Grams at a time
    assert not gathers_every_gram("rtn", sequential=False) and not gathers_every_gram("rtn", sequential=True)


def test_compare_with_sequential_gptq_never_gathers_every_units_gram(ctx, monkeypatch):
    """Sequential GPTQ measures one block's Grams at a time, so compare must
    not gather every unit's at once (on a 1.5B model that is 18 GB in float64
    and killed a compare); one-shot GPTQ still needs them all."""
    from bitalloc.scorers.context import ScoringContext

    def refuse(self):
        raise AssertionError("every unit's Gram was gathered")

    monkeypatch.setattr(ScoringContext, "hessians", property(refuse))
    settings = CompareSettings(budgets=(3.5,), scorers=("rtn-mse",), quantizers=("gptq",),
                               eval=EvalSettings(seq_len=48, windows=1))
    report = compare(ctx.loaded, settings, replace(SETTINGS, sequential=True), progress=False)
    assert {(r["quantizer"], r["method"]) for r in report["rows"]} == {("gptq", "uniform"), ("gptq", "llama-rule"),
                                                                        ("gptq", "rtn-mse")}
    with pytest.raises(AssertionError, match="every unit's Gram"):
        compare(ctx.loaded, settings, replace(SETTINGS, sequential=False), progress=False)


def test_kl_probes_quantize_as_the_plans_quantizer(ctx):
    """With GPTQ the kl table describes GPTQ's error: its probe entries equal
    the KL of the unit stored by GPTQ with its own Hessian, not by RTN."""
    from bitalloc.quantizers.gptq import gptq_quantize
    from bitalloc.formats.affine_rtn import dequantize
    from bitalloc.scorers import ScoringContext

    g = ScoringContext(ctx.model, ctx.tokenizer, ctx.inventory, ctx.options, calib_text=ctx.calib_text,
                       calib=ctx.calib, settings=ctx.settings, quantizer="gptq")
    table = score(g, ["kl"])["kl"]
    unit, opt = ctx.inventory.units[2], QuantOption(3, 64)
    W = get_weight(ctx.model, unit)
    Q = dequantize(gptq_quantize(W, g.hessians[unit.name], opt, damp=ctx.settings.damp, allow_ragged=True)[0])
    expected = _direct_kl(ctx, unit, Q)
    rtn = _direct_kl(ctx, unit, fake_quantize(W, opt))
    assert table.distortion[2, ctx.options.index(opt)] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(rtn, rel=1e-3)


def test_kl_probes_follow_gptq_act_order(ctx):
    """With --act-order the probes quantize as act-order GPTQ does, and their
    measurements are cached apart from plain GPTQ's."""
    from bitalloc.quantizers.gptq import gptq_quantize
    from bitalloc.formats.affine_rtn import dequantize
    from bitalloc.scorers import ScoringContext

    g = ScoringContext(ctx.model, ctx.tokenizer, ctx.inventory, ctx.options, calib_text=ctx.calib_text,
                       calib=ctx.calib, settings=ctx.settings, quantizer="gptq", act_order=True)
    table = score(g, ["kl"])["kl"]
    unit, opt = ctx.inventory.units[2], QuantOption(3, 64)
    W, H = get_weight(ctx.model, unit), g.hessians[unit.name]
    ordered = dequantize(gptq_quantize(W, H, opt, damp=ctx.settings.damp, act_order=True, allow_ragged=True)[0])
    plain = dequantize(gptq_quantize(W, H, opt, damp=ctx.settings.damp, allow_ragged=True)[0])
    assert not torch.equal(ordered, plain)  # else this test could not tell the two apart
    assert table.distortion[2, ctx.options.index(opt)] == pytest.approx(_direct_kl(ctx, unit, ordered), rel=1e-6)
