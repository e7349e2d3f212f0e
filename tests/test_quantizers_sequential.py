"""One-pass sequential GPTQ (bitalloc.quantizers.sequential) against the
per-layer driver it replaces (bitalloc.quantizers.apply._quantize_sequential), on
tiny random models of several families."""

from dataclasses import replace

import pytest
import torch

from bitalloc import api
from bitalloc.calib.grams import CalibSettings, calibration_windows
from bitalloc.formats.affine import QuantOption
from bitalloc.solve.problem import Budget
from bitalloc.formats.affine_rtn import dequantize
from bitalloc.quantizers.apply import _quantize_sequential, _quantize_unit, restored
from bitalloc.quantizers.sequential import LayerCaptureError, quantize_sequential
from bitalloc.scorers import score
from bitalloc.model.units import Unit, find_units
from conftest import char_tokenizer, tiny_llama

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**SMALL, "tie_word_embeddings": True, **overrides})).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # Conv1D weights: stored (in, out), units transposed
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256)).eval()


FAMILIES = {
    "llama": lambda: tiny_llama(num_hidden_layers=3),
    "qwen2": tiny_qwen2,  # q/k/v biases; rotary embeddings passed to every layer
    "gpt2": tiny_gpt2,  # positional cache and mask arguments; no rotary
}


@pytest.fixture(scope="module")
def windows():
    """(4, 48) calibration windows of the calibration half of the offline text."""
    text = api.calibration_text(None)[:20000]
    return calibration_windows(char_tokenizer(), text, CalibSettings(windows=4, seq_len=48))


def gptq_settings(bpw: float = 4.5, **kw) -> api.PlanSettings:
    return api.PlanSettings(Budget(bpw), quantizer="gptq", sequential=True, **kw)


def uniform(inventory, option: str):
    """Every unit at ``option`` (the budget is loose: the only candidate fits)."""
    return api.uniform_plan(inventory, [QuantOption.parse(option)], gptq_settings(8.0), "tiny")


def both_drivers(model, inventory, plan, windows):
    """(stored, logits on window 0) of the per-layer driver, then of the one-pass one."""
    results = []
    for run in (lambda: _quantize_sequential(model, inventory, plan, windows, _quantize_unit, None),
                lambda: quantize_sequential(model, inventory, plan, windows, _quantize_unit)):
        with restored(model), torch.no_grad():
            stored = run()
            results.append((stored, model(windows[:1]).logits))  # (1, seq, vocab)
    return results


def assert_same(per_layer, one_pass):
    (old, old_logits), (new, new_logits) = per_layer, one_pass
    assert list(new) == list(old)  # every unit, in the same order
    for name in old:
        a, b = old[name], new[name]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name
        assert (a.zeros is None) == (b.zeros is None) and (a.zeros is None or torch.equal(a.zeros, b.zeros)), name
        assert torch.allclose(dequantize(a), dequantize(b), rtol=0, atol=1e-6), name
    assert torch.allclose(old_logits, new_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pass_equals_per_layer(family, windows):
    model = FAMILIES[family]()
    inventory = find_units(model)
    plan = uniform(inventory, "int4-g32-asym")
    assert_same(*both_drivers(model, inventory, plan, windows))


def test_one_pass_equals_per_layer_with_a_mixed_plan(tiny_dir, windows):
    loaded = api.load(tiny_dir)
    settings = gptq_settings(3.5, act_order=True)
    # the solver's allocation itself (api.plan may keep a uniform plan that measures better)
    table = score(api.scoring_context(loaded, settings, progress=False), ["rtn-mse"])["rtn-mse"]
    plan = api.solve_plan(loaded.inventory, table, settings, "tiny")
    assert len(set(plan.assignment.values())) > 1  # different options per unit
    assert_same(*both_drivers(loaded.model, loaded.inventory, plan, windows))


def test_units_outside_the_layers_go_last_from_a_full_forward(windows):
    model = tiny_llama(num_hidden_layers=3, tie_word_embeddings=False)
    inventory = find_units(model)
    head = Unit("lm_head", "lm_head.weight", tuple(model.lm_head.weight.shape))  # excluded by the table; added here
    inventory = replace(inventory, units=inventory.units + (head,))
    plan = uniform(inventory, "int4-g32-sym")
    per_layer, one_pass = both_drivers(model, inventory, plan, windows)
    assert list(one_pass[0])[-1] == "lm_head"
    assert_same(per_layer, one_pass)


def test_a_model_with_no_numbered_block_gets_the_full_forward_only(windows):
    model = tiny_llama(num_hidden_layers=2, tie_word_embeddings=False)
    head = Unit("lm_head", "lm_head.weight", tuple(model.lm_head.weight.shape))
    inventory = replace(find_units(model), units=(head,))
    assert_same(*both_drivers(model, inventory, uniform(inventory, "int3-g32-asym"), windows))


def test_the_calibration_text_runs_through_the_model_once(windows):
    model = tiny_llama(num_hidden_layers=3)
    inventory = find_units(model)
    plan = uniform(inventory, "int3-g32-asym")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    try:
        with restored(model):
            quantize_sequential(model, inventory, plan, windows, _quantize_unit)
    finally:
        handle.remove()
    assert len(calls) == len(windows) + 1  # one forward per window, plus one window to check the chain


def test_the_gram_pass_stops_at_the_last_units_input(windows):
    """Each block's down_proj (the last linear called) runs in the chain
    check, once in the Gram pass (the window that finds the call order) and
    once per window to push the quantized block on: the Gram pass stops
    before it for the other windows. The last block is not pushed on."""
    model = tiny_llama(num_hidden_layers=3)
    inventory = find_units(model)
    runs = {i: 0 for i in range(3)}
    handles = [layer.mlp.down_proj.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
               for i, layer in enumerate(model.model.layers)]
    try:
        with restored(model):
            quantize_sequential(model, inventory, uniform(inventory, "int3-g32-asym"), windows, _quantize_unit)
    finally:
        for h in handles:
            h.remove()
    n = len(windows)
    assert runs == {0: 1 + 1 + n, 1: 1 + 1 + n, 2: 1 + 1}


def test_layers_with_different_masks_are_refused_before_any_change(windows):
    # sliding-window attention in layers >= 1 only: layer 1 gets another mask than layer 0
    model = tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    inventory = find_units(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayerCaptureError, match="attention_mask"):
        quantize_sequential(model, inventory, uniform(inventory, "int4-g32-asym"), windows, _quantize_unit)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
