"""GGUF types quantized by ggml: sizes against hand counts, bytes against
gguf-py's independent dequantizer, error against rate-distortion bounds, and
the imatrix file against llama.cpp's own GGUF parser and quantizer."""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, ggml
from bitalloc.formats.gguf_types import GGUF_TYPE_NAMES, GGUFType, gguf_types, parse_gguf_type
from bitalloc.formats.imatrix import (gguf_tensor_names, importance_vectors, read_imatrix,
                                      squared_sums_from_hessians, write_imatrix)

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python (ggml) is not installed")

# (weights per block, bytes per block), counted from the block structs of
# ggml-common.h; fp16 scales are 2 bytes, QK_K = 256.
HAND_LAYOUT = {
    "Q4_0": (32, 2 + 16),                    # d, 32 nibbles
    "Q4_1": (32, 2 + 2 + 16),                # d, min, 32 nibbles
    "Q5_0": (32, 2 + 4 + 16),                # d, 32 fifth bits, 32 nibbles
    "Q5_1": (32, 2 + 2 + 4 + 16),            # d, min, fifth bits, nibbles
    "Q8_0": (32, 2 + 32),                    # d, 32 int8
    "IQ4_NL": (32, 2 + 16),                  # d, 32 nibbles into a 16-value grid
    "Q2_K": (256, 16 + 64 + 2 + 2),          # 4-bit scale+min per 16, 2-bit codes, d, dmin
    "Q3_K": (256, 32 + 64 + 12 + 2),         # high bits, low 2 bits, 6-bit scales, d
    "Q4_K": (256, 2 + 2 + 12 + 128),         # d, dmin, 6-bit scales+mins, nibbles
    "Q5_K": (256, 2 + 2 + 12 + 32 + 128),    # as Q4_K plus 256 fifth bits
    "Q6_K": (256, 128 + 64 + 16 + 2),        # low nibbles, high 2 bits, int8 scale per 16, d
    "IQ4_XS": (256, 2 + 2 + 4 + 128),        # d, scales_h, scales_l, nibbles
    "IQ3_S": (256, 2 + 64 + 8 + 32 + 4),     # d, qs, qh, signs, scales
    "IQ3_XXS": (256, 2 + 96),                # d, 3 bytes per 8 weights
    "IQ2_S": (256, 2 + 64 + 8 + 8),          # d, qs, qh, scales
    "IQ2_XS": (256, 2 + 64 + 8),             # d, 32 uint16 grid indices, scales
    "F16": (1, 2),
}
# code bits of each type (its name), for the error bound
NOMINAL_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "Q4_0": 4, "Q4_1": 4,
                "Q5_0": 5, "Q5_1": 5, "IQ4_NL": 4, "IQ4_XS": 4, "IQ3_S": 3, "IQ3_XXS": 3, "IQ2_S": 2, "IQ2_XS": 2}
INSTALLED = [t.name for t in gguf_types()]


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)  # (rows, cols)


def some_importance(cols: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(cols) ** 2 * 4 + 0.05).astype(np.float32)  # (cols,)


def quantize(t: GGUFType, W: np.ndarray):
    return t.quantize(W, some_importance(W.shape[-1]) if t.requires_importance else None)


def test_enum_table_matches_gguf_py():
    for name, type_id in ggml.GGML_TYPE_IDS.items():
        assert gguf.GGMLQuantizationType[name] == type_id


def test_hand_counts_match_gguf_py():
    for name, layout in HAND_LAYOUT.items():
        assert gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == layout


def test_missing_llama_cpp_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(ggml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitallocError, match="pip install llama-cpp-python"):
        ggml.library_path()


def test_installed_ggml_offers_the_common_types():
    assert set(INSTALLED) <= set(GGUF_TYPE_NAMES)
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "F16"} <= set(INSTALLED)
    assert all(isinstance(t, Format) for t in gguf_types())


@pytest.mark.parametrize("name", INSTALLED)
@pytest.mark.parametrize("shape", [(3, 256), (7, 512), (1, 1024), (2, 5, 768)])
def test_storage_bits_equal_hand_count(name, shape):
    t = GGUFType(name)
    block, nbytes = HAND_LAYOUT[name]
    rows = int(np.prod(shape[:-1]))
    assert t.available(shape)
    assert t.storage_bits(shape) == rows * (shape[-1] // block) * nbytes * 8
    assert t.bpw == pytest.approx(8 * nbytes / block)
    assert ggml.row_size(name, shape[-1]) == shape[-1] // block * nbytes


@pytest.mark.parametrize("name", INSTALLED)
def test_ggml_bytes_read_by_gguf_py_equal_our_dequantize(name):
    """ggml's bytes, dequantized by gguf-py's numpy code, equal ours bit for bit."""
    t = GGUFType(name)
    W = gaussian(8, 512)
    stored = quantize(t, W)
    assert stored.nbytes * 8 == t.storage_bits(W.shape)
    ours = t.dequantize(stored)  # (8, 512)
    raw = np.frombuffer(stored.data, dtype=np.uint8).reshape(8, -1)  # (8, row bytes)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == W.shape
    assert np.array_equal(ours, ref)


def test_f16_is_the_numpy_cast():
    W = gaussian(4, 64)
    stored = GGUFType("F16").quantize(W)
    assert stored.data == W.astype(np.float16).tobytes()
    assert np.array_equal(GGUFType("F16").dequantize(stored), W.astype(np.float16).astype(np.float32))


def relative_mse(t: GGUFType, W: np.ndarray) -> float:
    return float(((t.dequantize(quantize(t, W)) - W) ** 2).sum() / (W**2).sum())


def test_error_decreases_with_bits():
    W = gaussian(32, 1024, seed=3)
    ladder = [n for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0") if n in INSTALLED]
    errs = [relative_mse(GGUFType(n), W) for n in ladder]
    assert all(a > b for a, b in zip(errs, errs[1:])), dict(zip(ladder, errs))


@pytest.mark.parametrize("name", [n for n in INSTALLED if n != "F16"])
def test_error_within_bounds(name):
    """Above the Gaussian rate-distortion bound 4^-bpw (nothing beats it); below
    a uniform grid of 2^b steps spanning ±4σ, (8/2^b)²/12."""
    t = GGUFType(name)
    rel = relative_mse(t, gaussian(32, 1024, seed=4))
    assert 4.0 ** -t.bpw < rel < (8.0 / 2 ** NOMINAL_BITS[name]) ** 2 / 12


def weighted_error(t: GGUFType, W: np.ndarray, imp: np.ndarray, importance) -> float:
    return float((imp * (t.dequantize(t.quantize(W, importance)) - W) ** 2).sum())


@pytest.mark.parametrize("name", INSTALLED)
def test_importance_is_used_where_the_type_takes_one(name):
    t = GGUFType(name)
    W, imp = gaussian(16, 512, seed=5), some_importance(512)
    with_imp = t.quantize(W, imp)
    if t.requires_importance:
        with pytest.raises(BitallocError, match="importance"):
            t.quantize(W)
        return
    without = t.quantize(W)
    if not t.uses_importance:
        assert with_imp == without
        return
    assert with_imp.data != without.data
    # weighting the rounding by importance lowers the importance-weighted error
    assert weighted_error(t, W, imp, imp) < weighted_error(t, W, imp, None)


def test_torch_and_numpy_inputs_agree():
    W = gaussian(4, 256)
    t = GGUFType("Q4_K")
    assert t.quantize(torch.from_numpy(W)) == t.quantize(W)


@pytest.mark.parametrize("name,cols,block", [("Q4_K", 96, 256), ("Q4_0", 48, 32), ("IQ4_XS", 320, 256)])
def test_unavailable_shapes_refused(name, cols, block):
    t = GGUFType(name)
    assert not t.available((4, cols))
    for call in (lambda: t.storage_bits((4, cols)), lambda: t.quantize(gaussian(4, cols)),
                 lambda: ggml.row_size(name, cols)):
        with pytest.raises(BitallocError, match=f"multiple of {block}"):
            call()


def test_bad_inputs_refused():
    t = GGUFType("Q4_K")
    with pytest.raises(BitallocError, match="one value per input column"):
        t.quantize(gaussian(2, 256), importance=np.ones(128))
    with pytest.raises(BitallocError, match="NaN"):
        t.quantize(np.full((2, 256), np.nan, dtype=np.float32))
    with pytest.raises(BitallocError, match="stored as Q4_K"):
        GGUFType("Q8_0").dequantize(t.quantize(gaussian(2, 256)))


def test_type_names_parsed_and_unknown_refused(monkeypatch):
    assert parse_gguf_type("q4_k") == GGUFType("Q4_K") == parse_gguf_type(" Q4_K ")
    with pytest.raises(BitallocError, match="Q4_K"):
        parse_gguf_type("Q9_K")
    with pytest.raises(BitallocError, match="must be one of"):
        GGUFType("q4_k")
    # a type this bitalloc knows but the installed ggml lacks
    lacking = {k: v for k, v in ggml.ggml_types().items() if k != "IQ3_S"}
    monkeypatch.setattr(ggml, "ggml_types", lambda: lacking)
    with pytest.raises(BitallocError, match=r"offers: .*Q4_K") as err:
        parse_gguf_type("iq3_s")
    assert "IQ3_S" not in str(err.value).split("offers:")[1]


# --- importance matrix -------------------------------------------------------


def test_importance_vectors_from_sums_and_hessians():
    X = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 0.0]])  # (tokens, in)
    sums = {"m": (X**2).sum(0)}  # (in,)
    assert np.allclose(importance_vectors(sums, {"m": 2})["m"], [5.0, 4.0, 0.0])
    H = {"m": 2 * X.T @ X / 2}  # bitalloc.calib.grams's convention, (in, in)
    assert np.allclose(squared_sums_from_hessians(H, {"m": 2})["m"], [10.0, 8.0, 0.0])
    assert np.allclose(importance_vectors({"m": np.zeros(3)}, {"m": 0})["m"], 1.0)  # llama-quantize's fallback


def llama_name_map(modules: list[str], n_blocks: int) -> dict[str, str]:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    return {m: tmap.get_name(f"{m}.weight", try_suffixes=(".weight",)) for m in modules}


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def write_example(path, cols=(256, 512, 256)):
    sums = {m: some_importance(c, seed=i) * 40.0 for i, (m, c) in enumerate(zip(MODULES, cols))}
    counts = {m: 40 + i for i, m in enumerate(MODULES)}
    write_imatrix(path, sums, counts, name_map=llama_name_map(MODULES, 2), datasets=["wiki.txt"],
                  chunk_count=5, chunk_size=8)
    return sums, counts


def test_imatrix_round_trips(tmp_path):
    path = tmp_path / "imatrix.gguf"
    sums, counts = write_example(path)
    names = gguf_tensor_names(MODULES, llama_name_map(MODULES, 2))
    assert names[MODULES[0]] == "blk.0.attn_q.weight" and names[MODULES[1]] == "blk.0.ffn_down.weight"
    back = read_imatrix(path)
    assert back.datasets == ("wiki.txt",) and (back.chunk_count, back.chunk_size) == (5, 8)
    assert set(back.sums) == set(names.values())
    expected = importance_vectors(sums, counts)
    for module, name in names.items():
        assert np.array_equal(back.sums[name], sums[module][None, :].astype(np.float32))
        assert back.counts[name].tolist() == [counts[module]]
        assert np.allclose(back.vectors()[name], expected[module], rtol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))


def test_imatrix_needs_names_and_metadata(tmp_path):
    with pytest.raises(BitallocError, match="No GGUF tensor name"):
        write_imatrix(tmp_path / "a.gguf", {"x": np.ones(4)}, {"x": 1}, name_map={}, datasets=["d"],
                      chunk_count=1, chunk_size=1)
    with pytest.raises(BitallocError, match="dataset"):
        write_imatrix(tmp_path / "b.gguf", {}, {}, name_map={}, datasets=[], chunk_count=1, chunk_size=1)


# --- llama.cpp itself ----------------------------------------------------------


def read_with_llama_cpp_parser(path) -> dict:
    """What common_imatrix_load sees: llama.cpp's own GGUF parser (in libggml-base)."""
    lib = ctypes.CDLL(str(ggml.library_path()))

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for fn, res in [("gguf_find_key", ctypes.c_int64), ("gguf_get_n_tensors", ctypes.c_int64),
                    ("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64)), ("gguf_get_val_u32", ctypes.c_uint32),
                    ("gguf_get_arr_n", ctypes.c_size_t), ("gguf_get_arr_str", ctypes.c_char_p)]:
        getattr(lib, fn).restype = res
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, "llama.cpp's GGUF parser refused the file"
    ctx = ctypes.c_void_p(ctx)
    try:
        key = {k: lib.gguf_find_key(ctx, k.encode()) for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                                 "imatrix.chunk_size")}
        assert all(v >= 0 for v in key.values())  # llama-quantize's has_metadata
        n_sets = lib.gguf_get_arr_n(ctx, ctypes.c_int64(key["imatrix.datasets"]))
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, ctypes.c_int64(i))
            tensors[lib.gguf_get_tensor_name(ctx, ctypes.c_int64(i)).decode()] = (
                lib.gguf_get_tensor_type(ctx, ctypes.c_int64(i)), (ne[0], ne[1]))
        return {"datasets": [lib.gguf_get_arr_str(ctx, ctypes.c_int64(key["imatrix.datasets"]), j).decode()
                             for j in range(n_sets)],
                "chunk_count": lib.gguf_get_val_u32(ctx, ctypes.c_int64(key["imatrix.chunk_count"])),
                "tensors": tensors}
    finally:
        lib.gguf_free(ctx)


def test_imatrix_parsed_by_llama_cpp(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_example(path)
    seen = read_with_llama_cpp_parser(path)
    assert seen["datasets"] == ["wiki.txt"] and seen["chunk_count"] == 5
    f32 = ggml.GGML_TYPE_IDS["F32"]
    assert seen["tensors"]["blk.0.ffn_down.weight.in_sum2"] == (f32, (512, 1))  # ggml ne: (n_in, n_mat)
    assert seen["tensors"]["blk.0.ffn_down.weight.counts"] == (f32, (1, 1))
    assert len(seen["tensors"]) == 2 * len(MODULES)


def tiny_llama_gguf(path, d: int = 256, ff: int = 512, vocab: int = 32) -> dict[str, np.ndarray]:
    """A one-block Llama in F32, enough for llama_model_quantize; returns its tensors."""
    rng = np.random.default_rng(7)
    shapes = {"token_embd.weight": (vocab, d), "output.weight": (vocab, d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d),
              "blk.0.attn_k.weight": (d, d), "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff)}
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(64); w.add_embedding_length(d); w.add_block_count(1)  # noqa: E702
    w.add_feed_forward_length(ff); w.add_head_count(4); w.add_head_count_kv(4)  # noqa: E702
    w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(vocab); w.add_file_type(0)  # noqa: E702
    for name, T in tensors.items():
        w.add_tensor(name, T)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    return tensors


def test_llama_quantize_with_our_imatrix_matches_bitalloc(tmp_path):
    """llama.cpp's quantizer, fed the vectors read back from our file the way
    llama-quantize feeds them, writes the bytes bitalloc's Q4_K writes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model_in, model_out, imatrix_path = tmp_path / "f32.gguf", tmp_path / "q4k.gguf", tmp_path / "imatrix.gguf"
    tensors = tiny_llama_gguf(model_in)
    write_example(imatrix_path)
    vectors = read_imatrix(imatrix_path).vectors()  # gguf name -> (n_in,)
    entries = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()  # NULL name ends the list
    for e, (name, v) in zip(entries, vectors.items()):
        e.name, e.size = name.encode(), v.size
        e.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True, 1
    params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(model_in).encode(), str(model_out).encode(), ctypes.byref(params)) == 0
    written = {t.name: t for t in gguf.GGUFReader(str(model_out)).tensors}
    q4k = GGUFType("Q4_K")
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.attn_k.weight"):
        assert written[name].tensor_type == gguf.GGMLQuantizationType.Q4_K
        ours = q4k.quantize(tensors[name], vectors.get(name))  # attn_k has no imatrix entry
        assert np.asarray(written[name].data).tobytes() == ours.data, name
    # and the imatrix mattered: without it attn_q comes out otherwise
    W_q = tensors["blk.0.attn_q.weight"]  # (256, 256)
    assert q4k.quantize(W_q).data != q4k.quantize(W_q, vectors["blk.0.attn_q.weight"]).data
