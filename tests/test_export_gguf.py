"""GGUF export (bitalloc.export.gguf) and llama.cpp evaluation
(bitalloc.evaluate.llamacpp).

Fast tier: a tiny random Llama written here as a GGUF file the way llama.cpp's
converter writes one (Q/K rows permuted for llama.cpp's RoPE, llama metadata,
no tokenizer: ``tokenizer.ggml.model = "none"`` and ``llama.vocab_size``),
so llama.cpp and transformers both load it; the windows are random token ids.
Slow tier: the embedded SmolLM2-135M (Q4_1 GGUF) with a few tensors changed.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.evaluate import window_logprobs
from bitalloc.formats import ggml
from bitalloc.formats.gguf_types import GGUFType

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python (ggml, llama.cpp) is not installed")

from bitalloc.evaluate.llamacpp import evaluate_gguf, llamacpp_logprobs  # noqa: E402
from bitalloc.export.gguf import hf_to_gguf_names, tensor_type_recipe, write_gguf  # noqa: E402

# hidden 64: only 32-weight block types fit most matrices; ffn_down has rows
# of 256 (intermediate_size), so the K-quants fit there. initializer_range
# 0.2 gives peaked next-token distributions (entropy ~3.7 nats of 4.85), so
# a wrong weight or layout shows up in the log-probs.
TINY = dict(intermediate_size=256, initializer_range=0.2)
PLAN = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q5_0", "blk.0.attn_v.weight": "Q4_1",
    "blk.0.attn_output.weight": "IQ4_NL", "blk.0.ffn_gate.weight": "Q5_1", "blk.0.ffn_up.weight": "Q4_0",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_q.weight": "Q4_0", "blk.1.ffn_down.weight": "Q4_K", "blk.1.ffn_up.weight": "F16",
}
# KL(transformers || llama.cpp), nats per token, mean over positions: see test_llamacpp_agrees_with_transformers
KL_TOLERANCE = 2e-3


def _permute(W: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head reordered from HF's rotate-half
    pairing (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that stands for it."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
             *range(ord("\u00ae"), ord("\u00ff") + 1)]
    hidden = [b for b in range(256) if b not in shown]
    return {**{b: chr(b) for b in shown}, **{b: chr(256 + n) for n, b in enumerate(hidden)}}


def _add_byte_tokenizer(writer, vocab: int) -> None:
    """A byte-level BPE vocabulary of ``vocab`` tokens that transformers and
    llama.cpp both read: bytes 0..vocab-3 (token id = byte value), one merge
    (" t") and an end-of-text token, which is also BOS."""
    alphabet = _byte_alphabet()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([alphabet[b] for b in range(vocab - 2)] + ["\u0120t", "<|endoftext|>"])
    writer.add_token_types([1] * (vocab - 1) + [3])
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)


def write_tiny_gguf(model, path, *, permute: bool = True, skip_keys: tuple[str, ...] = (),
                    tokenizer: bool = False) -> None:
    """A HF Llama as an F32 GGUF file that llama.cpp loads; with an empty
    array in its metadata, which gguf-py's own writer refuses (the exporter's
    writer allows it; GGUFReader checks the bytes). ``tokenizer``: with a
    byte-level vocabulary, so text can be evaluated on it."""
    from bitalloc.export.gguf import _writer

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = _writer(str(path), "llama")
    rope_theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    keys = {
        "context_length": (writer.add_context_length, cfg.max_position_embeddings),
        "embedding_length": (writer.add_embedding_length, cfg.hidden_size),
        "block_count": (writer.add_block_count, cfg.num_hidden_layers),
        "feed_forward_length": (writer.add_feed_forward_length, cfg.intermediate_size),
        "head_count": (writer.add_head_count, cfg.num_attention_heads),
        "head_count_kv": (writer.add_head_count_kv, cfg.num_key_value_heads),
        "rope_dimension_count": (writer.add_rope_dimension_count, cfg.hidden_size // cfg.num_attention_heads),
        "rope_freq_base": (writer.add_rope_freq_base, float(rope_theta)),
        "layer_norm_rms_eps": (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        "vocab_size": (writer.add_vocab_size, cfg.vocab_size),
        "file_type": (writer.add_file_type, int(gguf.LlamaFileType.ALL_F32)),
        "tokenizer_model": ((lambda v: _add_byte_tokenizer(writer, cfg.vocab_size)) if tokenizer else
                            writer.add_tokenizer_model, "none"),
    }
    for key, (add, value) in keys.items():
        if key not in skip_keys:
            add(value)
    writer.add_key_value("bitalloc.test.empty", [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    writer.add_array("bitalloc.test.strings", ["a", "ü", ""])
    for name, W in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        W = W.detach().float().numpy()  # (out, in) or (n,)
        if permute and name.endswith("q_proj.weight"):
            W = _permute(W, cfg.num_attention_heads)
        if permute and name.endswith("k_proj.weight"):
            W = _permute(W, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(W))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_model():
    from conftest import tiny_llama

    return tiny_llama(**TINY)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-source") / "tiny.gguf"
    write_tiny_gguf(tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def importance():
    rng = np.random.default_rng(3)
    return {"blk.1.ffn_down.weight": (rng.random(256) ** 2 + 0.05).astype(np.float32),
            "blk.0.attn_v.weight": (rng.random(64) ** 2 + 0.05).astype(np.float32)}


@pytest.fixture(scope="module")
def exported(tiny_source, importance, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-export") / "mixed.gguf"
    return out, write_gguf(tiny_source, out, PLAN, importance=importance)


def windows(n: int = 3, length: int = 32, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(7))  # (n, length)


def tensors_by_name(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def metadata(path) -> dict:
    fields = gguf.GGUFReader(str(path)).fields
    return {k: (f.types, f.contents()) for k, f in fields.items() if not k.startswith("GGUF.")}


# ---- the file ----------------------------------------------------------------

def test_export_has_planned_types_sizes_and_ggml_values(tiny_source, exported, importance):
    out, report = exported
    source, written = tensors_by_name(tiny_source), tensors_by_name(out)
    assert list(written) == list(source)
    for name, t in written.items():
        want = PLAN.get(name, "F32")
        assert t.tensor_type.name == want, name
        shape = tuple(reversed(t.shape.tolist()))
        rows, cols = math.prod(shape[:-1]), shape[-1]
        predicted = rows * ggml.row_size(want, cols)
        assert int(t.n_bytes) == predicted == report["tensors"][name]["data_bytes"], name
        assert report["tensors"][name]["predicted_bytes"] == predicted
        W_source = gguf.dequantize(source[name].data, source[name].tensor_type)  # (out, in), float32
        got = gguf.dequantize(t.data, t.tensor_type)
        if name in PLAN:
            fmt = GGUFType(want)
            assert predicted * 8 == fmt.storage_bits(shape)
            expected = fmt.dequantize(fmt.quantize(W_source, importance.get(name)))
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            assert bytes(t.data) == bytes(source[name].data), name  # copied as is
    assert report["tensor_data_bytes"] == report["predicted_tensor_data_bytes"] == sum(
        int(t.n_bytes) for t in written.values())
    assert report["file_bytes"] == out.stat().st_size


def test_importance_reaches_ggml(tiny_source, exported, importance):
    """Q4_K of blk.1.ffn_down with the importance differs from Q4_K without it."""
    out, _ = exported
    name = "blk.1.ffn_down.weight"
    W = gguf.dequantize(tensors_by_name(tiny_source)[name].data, gguf.GGMLQuantizationType.F32)
    assert bytes(tensors_by_name(out)[name].data) == GGUFType("Q4_K").quantize(W, importance[name]).data
    assert bytes(tensors_by_name(out)[name].data) != GGUFType("Q4_K").quantize(W).data


def test_metadata_copied_and_file_type_relabelled(tiny_source, exported):
    out, _ = exported
    src, new = metadata(tiny_source), metadata(out)
    assert set(src) == set(new)
    for key in src:
        if key != "general.file_type":
            assert new[key] == src[key], key
    assert new["bitalloc.test.empty"][1] == [] and new["bitalloc.test.strings"][1] == ["a", "ü", ""]
    # the untouched F32 matrices of blk.1 (24,576 weights) outweigh the Q8_0 ones (12,288)
    assert new["general.file_type"][1] == int(gguf.LlamaFileType.ALL_F32)


def test_file_type_names_the_type_of_most_weights(tiny_source, tmp_path):
    matrices = [n for n, t in tensors_by_name(tiny_source).items() if len(t.shape) == 2]
    plan = {n: "Q4_K" if "ffn_down" in n else "Q5_1" for n in matrices}  # Q5_1: 98,304 weights, Q4_K: 32,768
    write_gguf(tiny_source, tmp_path / "q5_1.gguf", plan)
    assert metadata(tmp_path / "q5_1.gguf")["general.file_type"][1] == int(gguf.LlamaFileType.MOSTLY_Q5_1)


def test_reexport_copies_same_type_and_requantizes_the_rest(exported, tmp_path):
    """From an already quantized source (like the embedded Q4_1 model): a tensor
    planned at its own type keeps its bytes; another is requantized from the
    dequantized source values."""
    source, _ = exported
    plan = {"blk.0.attn_q.weight": "q8_0", "blk.0.ffn_down.weight": "Q4_K", "blk.1.attn_v.weight": "Q8_0"}
    out = tmp_path / "again.gguf"
    report = write_gguf(source, out, plan)
    before, after = tensors_by_name(source), tensors_by_name(out)
    assert bytes(after["blk.0.attn_q.weight"].data) == bytes(before["blk.0.attn_q.weight"].data)
    assert report["tensors"]["blk.0.attn_q.weight"]["quantized"] is False
    W = gguf.dequantize(before["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q6_K)  # (64, 256)
    assert bytes(after["blk.0.ffn_down.weight"].data) == GGUFType("Q4_K").quantize(W).data
    assert after["blk.1.attn_v.weight"].tensor_type.name == "Q8_0"
    assert report["tensor_data_bytes"] == report["predicted_tensor_data_bytes"]


def test_tensor_type_recipe_is_anchored_per_tensor():
    text = tensor_type_recipe({"blk.0.attn_q.weight": "Q8_0", "output.weight": "q6_k"})
    assert text == "^blk\\.0\\.attn_q\\.weight$=q8_0\n^output\\.weight$=q6_k\n"
    import re

    pattern = text.splitlines()[1].split("=")[0]
    assert re.search(pattern, "output.weight") and not re.search(pattern, "blk.3.attn_output.weight")


def test_hf_names_map_to_the_tiny_files_tensors(tiny_source):
    from bitalloc.model.units import find_units

    model = tiny_model()
    units = [u.name for u in find_units(model).units]
    names = hf_to_gguf_names(units + ["model.embed_tokens"], n_blocks=model.config.num_hidden_layers)
    assert names["model.layers.1.self_attn.q_proj"] == "blk.1.attn_q.weight"
    assert names["model.layers.0.mlp.down_proj"] == "blk.0.ffn_down.weight"
    assert names["model.embed_tokens"] == "token_embd.weight"
    present = set(tensors_by_name(tiny_source))
    assert all(n in present for u, n in names.items() if u != "lm_head")  # tied: lm_head is token_embd
    with pytest.raises(BitallocError, match="no GGUF tensor name"):
        hf_to_gguf_names(["model.layers.0.mlp.experts.gate_up_proj[3].gate"], n_blocks=2)
    with pytest.raises(BitallocError, match="'arch' parameter"):
        hf_to_gguf_names(["model.embed_tokens"], n_blocks=2, arch="no-such-arch")


# ---- in llama.cpp --------------------------------------------------------------

def _transformers_logprobs(path, rows: torch.Tensor) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return [window_logprobs(model, r) for r in rows]


def _mean_kl(P: list[torch.Tensor], Q: list[torch.Tensor]) -> float:
    """KL(P || Q), nats per position, over all windows."""
    return float(sum((p.exp() * (p - q)).sum() for p, q in zip(P, Q)) / sum(p.shape[0] for p in P))


def test_llamacpp_agrees_with_transformers(exported, tiny_source, tmp_path):
    """llama.cpp runs the exported file; transformers loads the same file
    (gguf-py dequantizes, its loader undoes the Q/K permutation) and runs it in
    float32. They differ by llama.cpp's arithmetic only: for quantized types it
    rounds the activations to 8-bit blocks (Q8_0 / Q8_K) before each dot
    product, and its KV cache is F16. KL_TOLERANCE bounds that; a Q/K layout
    error costs far more (checked on a file written without the permutation)."""
    out, _ = exported
    rows = windows()
    theirs = llamacpp_logprobs(out, rows)
    ours = _transformers_logprobs(out, rows)
    assert [t.shape for t in theirs] == [(rows.shape[1] - 1, 128)] * len(rows)
    kl = _mean_kl(ours, theirs)
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    print(f"llama.cpp vs transformers on the mixed file: KL {kl:.3g} nats/token, max |dlogp| {max_abs:.3g}")
    assert 0 <= kl < KL_TOLERANCE

    result = evaluate_gguf(out, rows, ours)
    assert result.kl == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert result.top1 > 0.85 and result.tokens == rows.numel() - len(rows)
    assert math.isclose(result.nll, -sum(float(o.gather(1, r[1:, None]).sum()) for o, r in zip(theirs, rows))
                        / result.tokens, rel_tol=1e-6)

    # the same check has teeth: without the converter's permutation llama.cpp applies RoPE to the wrong pairs
    unpermuted = tmp_path / "unpermuted.gguf"
    write_tiny_gguf(tiny_model(), unpermuted, permute=False)
    wrong = _mean_kl(_transformers_logprobs(tiny_source, rows), llamacpp_logprobs(unpermuted, rows))
    print(f"RoPE layout error: KL {wrong:.3g} nats/token")
    assert wrong > 10 * KL_TOLERANCE


def test_llamacpp_on_the_f32_source_is_close_to_exact(tiny_source):
    rows = windows(2, 16)
    kl = _mean_kl(_transformers_logprobs(tiny_source, rows), llamacpp_logprobs(tiny_source, rows))
    assert 0 <= kl < 1e-5  # F32 weights: only the F16 KV cache and summation order differ


# ---- bad inputs: one clear error, no file ------------------------------------------

def _assert_fails_cleanly(folder, call, match):
    before = set(folder.iterdir()) if folder.exists() else set()
    with pytest.raises(BitallocError, match=match):
        call()
    after = set(folder.iterdir()) if folder.exists() else set()
    assert after == before, f"left behind: {sorted(map(str, after - before))}"


@pytest.mark.parametrize("plan, match", [
    ({"blk.0.attn_q.weight": "Q4_K"}, r"'blk\.0\.attn_q\.weight' has rows of 64 weights.*blocks of 256"),
    ({"blk.0.attn_q.weight": "TQ1_0"}, r"blk\.0\.attn_q\.weight.*Unknown or unsupported GGUF type 'TQ1_0'"),
    ({"blk.0.attn_norm.weight": "Q8_0"}, r"is 1-D"),
    ({"blk.9.attn_q.weight": "Q8_0"}, r"does not have, e\.g\. 'blk\.9\.attn_q\.weight'"),
    ({"blk.1.ffn_down.weight": "IQ2_XS"}, r"needs an importance vector"),
])
def test_bad_plan(tiny_source, tmp_path, plan, match):
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, tmp_path / "out.gguf", plan), match)


def test_type_the_installed_ggml_lacks(tiny_source, tmp_path, monkeypatch):
    real = ggml.ggml_types()
    monkeypatch.setattr(ggml, "ggml_types", lambda: {k: v for k, v in real.items() if k != "Q6_K"})
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, tmp_path / "out.gguf",
                                                       {"blk.0.ffn_down.weight": "Q6_K"}),
                          r"'blk\.0\.ffn_down\.weight'.*'Q6_K'.*installed ggml offers")


def test_bad_importance_shape(tiny_source, tmp_path):
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, tmp_path / "out.gguf", PLAN,
                                                       importance={"blk.0.attn_q.weight": np.ones(63)}),
                          r"one value per input column, shape \(64,\)")


def test_source_not_a_gguf(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(text, tmp_path / "out.gguf", {}), "not a GGUF model")
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tmp_path / "missing.gguf", tmp_path / "out.gguf", {}),
                          "does not exist")


def test_unwritable_output(tiny_source, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, blocker / "out.gguf", PLAN), "is a file, not a folder")
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, tmp_path, PLAN), "is a folder")
    _assert_fails_cleanly(tiny_source.parent, lambda: write_gguf(tiny_source, tiny_source, PLAN), "is the source")


def test_failure_while_writing_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    from bitalloc.export import gguf as export_gguf

    def broken(plan, tensor, importance):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_gguf, "_tensor_data", broken)
    _assert_fails_cleanly(tmp_path, lambda: write_gguf(tiny_source, tmp_path / "out.gguf", PLAN),
                          "cannot be written: No space left on device")


def test_llamacpp_errors(tiny_source, tmp_path, monkeypatch):
    broken = tmp_path / "no-blocks.gguf"
    write_tiny_gguf(tiny_model(), broken, skip_keys=("block_count",))
    with pytest.raises(BitallocError, match="llama.cpp could not load"):
        llamacpp_logprobs(broken, windows(1, 8))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(BitallocError, match="not a GGUF model"):
        llamacpp_logprobs(text, windows(1, 8))
    with pytest.raises(BitallocError, match="vocabulary has 128 tokens"):
        llamacpp_logprobs(tiny_source, windows(1, 8, vocab=1000) + 200)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(BitallocError, match="needs llama-cpp-python"):
        evaluate_gguf(tiny_source, windows(1, 8))


# ---- the embedded SmolLM2-135M ---------------------------------------------------------

@pytest.mark.slow
def test_smollm2_export_loads_in_llamacpp(tmp_path):
    """ffn_down has rows of 1536 weights (256-block types fit); every other
    matrix has rows of 576 (32-block types only)."""
    from pathlib import Path

    from bitalloc.evaluate import EvalSettings, token_windows
    from bitalloc.model.loading import embedded_source, load_tokenizer
    from bitalloc.evaluate.text import wiki_text

    source = embedded_source()
    src = Path(source.path) / source.gguf_file
    plan = {"blk.0.ffn_down.weight": "Q6_K", "blk.29.ffn_down.weight": "Q6_K", "blk.0.attn_q.weight": "Q8_0",
            "blk.0.attn_k.weight": "Q8_0", "blk.15.attn_output.weight": "Q8_0"}
    out = tmp_path / "smollm2-mixed.gguf"
    report = write_gguf(src, out, plan)

    before = tensors_by_name(src)
    delta = 0
    for name, info in report["tensors"].items():
        assert info["data_bytes"] == info["predicted_bytes"], name
        delta += info["data_bytes"] - int(before[name].n_bytes)
    # by hand: Q6_K rows of 1536 are 6 blocks × 210 bytes; Q8_0 rows of 576 are 18 × 34; Q4_1 18 × 20
    assert delta == 2 * 576 * (6 * 210 - 48 * 20) + (576 + 192 + 576) * 18 * (34 - 20)
    assert report["tensor_data_bytes"] == report["predicted_tensor_data_bytes"]
    assert report["file_bytes"] == src.stat().st_size + delta
    after = tensors_by_name(out)
    assert bytes(after["blk.1.ffn_down.weight"].data) == bytes(before["blk.1.ffn_down.weight"].data)

    rows = token_windows(load_tokenizer(source), wiki_text("eval"), EvalSettings(seq_len=64, windows=2))
    reference = llamacpp_logprobs(src, rows)
    result = evaluate_gguf(out, rows, reference)
    base = evaluate_gguf(src, rows)
    print(f"SmolLM2 source ppl {base.ppl:.3f}, export ppl {result.ppl:.3f}, KL {result.kl:.3g}, top1 {result.top1:.3f}")
    # the totals by hand from llama.cpp's own log-probs of the exported file: 2 windows x 63 predicted tokens
    mine = llamacpp_logprobs(out, rows)
    nll = -sum(float(lp.gather(1, r[1:, None]).sum()) for lp, r in zip(mine, rows)) / (2 * 63)
    kl = sum(float((ref.exp() * (ref - lp)).sum()) for ref, lp in zip(reference, mine)) / (2 * 63)
    top1 = sum(int((ref.argmax(1) == lp.argmax(1)).sum()) for ref, lp in zip(reference, mine)) / (2 * 63)
    assert result.tokens == 2 * 63 and result.nll == pytest.approx(nll, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-6) and result.kl == pytest.approx(kl, rel=1e-5, abs=1e-9)
    assert result.top1 == pytest.approx(top1)
    assert 0 <= result.kl < 0.1 and result.top1 > 0.8  # Q6_K/Q8_0 in place of Q4_1 stays close to the source
