"""The vLLM menu (``--format vllm``) and the compressed-tensors export.

Truths from outside the code under test: decompression by the
compressed-tensors package itself, codes unpacked here from the int32 words
by hand (dense little-endian bit packing), byte counts from the safetensors
header read with ``struct``/``json`` and from a hand count of the layout, and
logits from transformers' own compressed-tensors loader."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.api import MenuSettings, PlanSettings
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_option
from bitalloc.formats.affine_rtn import dequantize
from bitalloc.formats.wna16 import WNA16Option, wna16_menu
from bitalloc.plan import Plan
from bitalloc.solve.problem import Budget

sys.path.insert(0, str(Path(__file__).parent))

ALL_SCHEMES = wna16_menu((4, 8), (32, 64, 128, 0), ("sym", "asym"))
SHAPE = dict(hidden_size=128, intermediate_size=256)  # every group size of the menu divides every unit


def safetensors_header(path: Path) -> dict:
    """name -> (dtype, shape, bytes), read from the file's own header."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def unpack_words(words: torch.Tensor, bits: int, count: int, dim: int) -> np.ndarray:
    """Signed codes from int32 words packed densely along ``dim``, least significant bit first, offset 2^(b-1)."""
    w = np.ascontiguousarray(words.numpy() if dim == 1 else words.numpy().T)
    stream = np.unpackbits(w.astype("<u4").view(np.uint8).reshape(w.shape[0], -1), axis=1, bitorder="little")
    codes = (stream[:, : count * bits].reshape(w.shape[0], count, bits) << np.arange(bits)).sum(-1)
    codes = codes.astype(np.int64) - 2 ** (bits - 1)
    return codes if dim == 1 else codes.T


def test_names_parse_and_costs_by_hand():
    assert parse_option("w4a16-g128-sym") == WNA16Option(4, 128, True)
    assert parse_option("w8a16-pc-asym") == WNA16Option(8, 0, False)
    assert parse_option("w4a16-g128-sym") != parse_option("int4-g128-sym")  # same codes, another cost
    # (64, 128) at w4a16-g32-asym: codes 64 x 16 words, scales 64 x 4 fp16, zero points ceil(64*4/32)=8 x 4 words,
    # the shape 2 int64: 4096 + 512 + 128 + 16 bytes
    assert WNA16Option(4, 32, False).storage_bits((64, 128)) == (4096 + 512 + 128 + 16) * 8
    # (48, 96) at w8a16-pc-sym: 48 x 24 words, 48 fp16 scales, shape
    assert WNA16Option(8, 0, True).storage_bits((48, 96)) == (48 * 24 * 4 + 48 * 2 + 16) * 8
    # (10, 128) at w8a16-pc-asym: zero points ceil(10*8/32)=3 words
    assert WNA16Option(8, 0, False).storage_bits((10, 128)) == (10 * 32 * 4 + 10 * 2 + 3 * 4 + 16) * 8
    for bad in ("w3a16-g128-sym", "w4a16-g48-sym", "w4a8-g128-sym"):
        with pytest.raises(BitallocError):
            parse_option(bad)


@pytest.mark.parametrize("option", ALL_SCHEMES, ids=lambda o: o.name)
def test_every_scheme_round_trips_through_compressed_tensors(option):
    """bitalloc's codes -> compressed-tensors' compressor -> its decompressor
    gives bitalloc's dequantized weight exactly (in fp16, the type it is
    held in), and the packed words hold bitalloc's codes."""
    from compressed_tensors.compressors import BaseCompressor

    from bitalloc.export.compressed_tensors import CT_FORMAT, ct_module_state, ct_scheme
    from bitalloc.quantizers.gptq import gptq_quantize

    torch.manual_seed(0)
    W = torch.randn(40, 256) * torch.linspace(0.2, 3.0, 256)
    X = torch.randn(512, 256)
    for qw in (option.quantize(W), gptq_quantize(W, 2 * X.T @ X / 512, option)[0]):
        state = ct_module_state(qw)
        compressor = BaseCompressor.load_from_registry(CT_FORMAT)
        packed = compressor.compress(dict(state), ct_scheme(option, ["m"]))
        back = compressor.decompress(dict(packed), ct_scheme(option, ["m"]))["weight"]
        assert torch.equal(back.half(), dequantize(qw).half())
        half = 2 ** (option.bits - 1)
        assert np.array_equal(unpack_words(packed["weight_packed"], option.bits, 256, 1),
                              qw.codes.long().numpy() - half)
        if not option.symmetric:
            assert np.array_equal(unpack_words(packed["weight_zero_point"], option.bits, 40, 0),
                                  qw.zeros.long().numpy() - half)
        else:
            assert "weight_zero_point" not in packed
        assert torch.equal(packed["weight_scale"], qw.scales)
        assert packed["weight_shape"].tolist() == [40, 256]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import char_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("ct") / "tiny"
    tiny_llama(**SHAPE).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def vllm_settings(bpw: float, schemes=("sym",), **kw) -> PlanSettings:
    return PlanSettings(Budget(bpw), scorer="rtn-mse", menu=MenuSettings(format="vllm", schemes=schemes,
                                                                         imatrix=False), **kw)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """A sym and an asym plan at 6 bpw, each exported and quantized natively."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for schemes in (("sym",), ("sym", "asym")):
        tag = "-".join(schemes)
        plan_path = str(root / f"plan-{tag}.json")
        api.plan(tiny, settings=vllm_settings(6.0, schemes), out=plan_path, progress=False)
        api.quantize(tiny, plan_path=plan_path, out=str(root / f"ct-{tag}"), progress=False, to="compressed-tensors")
        api.quantize(tiny, plan_path=plan_path, out=str(root / f"native-{tag}"), progress=False)
        out[tag] = (plan_path, root / f"ct-{tag}", root / f"native-{tag}")
    return out


def test_plan_ties_fused_layers_and_keeps_the_budget(tiny, exported):
    loaded = api.load(tiny)
    for plan_path, _, _ in exported.values():
        plan = Plan.load(plan_path)
        assert all(isinstance(o, WNA16Option) for o in plan.assignment.values())
        for layer in range(2):
            a = {k.rsplit(".", 1)[1]: v.name for k, v in plan.assignment.items() if f".{layer}." in k}
            assert a["q_proj"] == a["k_proj"] == a["v_proj"] and a["gate_proj"] == a["up_proj"]
        bits = sum(plan.assignment[u.name].storage_bits(u.shape) for u in loaded.inventory.units)
        assert bits <= 6.0 * sum(u.shape[0] * u.shape[1] for u in loaded.inventory.units)
    assert len({o.name for o in Plan.load(exported["sym"][0]).assignment.values()}) > 1  # a real mix


def test_written_bytes_equal_predicted_bytes(tiny, exported):
    loaded = api.load(tiny)
    for plan_path, folder, _ in exported.values():
        plan, header = Plan.load(plan_path), safetensors_header(folder / "model.safetensors")
        planned = set()
        for u in loaded.inventory.units:
            prefix = u.param[: -len(".weight")]
            keys = [k for k in header if k.startswith(prefix + ".")]
            planned |= set(keys)
            assert plan.assignment[u.name].storage_bits(u.shape) == 8 * sum(header[k][2] for k in keys)
            assert header[prefix + ".weight_packed"][0] == "I32" and header[prefix + ".weight_scale"][0] == "F16"
        kept = {k: v for k, v in header.items() if k not in planned}
        assert all(v[0] == "F16" for v in kept.values())
        assert sum(v[2] for v in header.values()) == plan.sizes(loaded.inventory).model_bytes


def test_config_is_compressed_tensors_own(exported):
    from compressed_tensors.quantization import QuantizationConfig

    _, folder, _ = exported["sym-asym"]
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    config = QuantizationConfig.model_validate(q)
    targets = [t for g in config.config_groups.values() for t in g.targets]
    assert len(targets) == len(set(targets)) == 14  # 7 linears x 2 layers, each in one group
    plan = Plan.load(str(folder / "plan.json"))
    for group in config.config_groups.values():
        for t in group.targets:
            option = plan.assignment[t]
            w = group.weights
            assert (w.num_bits, w.symmetric, w.group_size or 0) == (option.bits, option.symmetric, option.group_size)


def test_transformers_loads_the_folder_with_bitalloc_logits(exported):
    """transformers' compressed-tensors integration (sym: it cannot read
    packed zero points at these versions) and bitalloc's own reader (both)
    give the logits of bitalloc's native quantized folder."""
    from transformers import AutoModelForCausalLM

    from bitalloc.export.native import load_quantized
    from bitalloc.model.loading import load_model, resolve_source

    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 90, 11]])
    for tag, (_, folder, native) in exported.items():
        ref, _, _ = load_quantized(str(native))
        with torch.no_grad():
            want = ref(ids).logits
            ours = load_model(resolve_source(str(folder)))[0](ids).logits
        assert (ours - want).abs().max().item() == 0.0, tag
        if tag == "sym":
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            with torch.no_grad():
                got = model(ids).logits
            delta = (got - want).abs().max().item()
            print(f"transformers' load vs bitalloc: max |dlogit| {delta:.3g}")
            assert delta <= 1e-5 * max(1.0, want.abs().max().item())


def test_eval_and_export_cli(tiny, exported, tmp_path, text_file):
    plan_path, folder, _ = exported["sym"]
    out = tmp_path / "ct"
    assert main(["--quiet", "export", plan_path, "--to", "compressed-tensors", "--model", tiny, "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()  # deterministic
    assert main(["--quiet", "eval", "--model", str(out), "--reference", tiny, "--text", text_file, "--windows", "1",
                 "--seq-len", "32"]) == 0


def test_broken_tie_and_foreign_options_are_refused(tiny, exported, tmp_path, capsys):
    plan_path, _, _ = exported["sym"]
    data = json.loads(Path(plan_path).read_text())
    k = "model.layers.0.self_attn.k_proj"
    data["units"][k] = "w4a16-pc-sym" if data["units"][k] != "w4a16-pc-sym" else "w4a16-g32-sym"
    bad = tmp_path / "untied.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "never"
    assert main(["--quiet", "export", str(bad), "--to", "compressed-tensors", "--model", tiny, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one fused layer" in err[0] and "k_proj" in err[0]
    assert not out.exists()
    int_plan = tmp_path / "int.json"
    api.plan(tiny, settings=PlanSettings(Budget(4.0), scorer="rtn-mse", menu=MenuSettings(imatrix=False)),
             out=str(int_plan), progress=False)
    assert main(["--quiet", "export", str(int_plan), "--to", "compressed-tensors", "--model", tiny, "--out",
                 str(out)]) != 0
    assert "does not serve" in capsys.readouterr().err and not out.exists()


def test_menu_refusals(tiny):
    loaded = api.load(tiny)
    from bitalloc.formats.menu import resolve_menu

    with pytest.raises(BitallocError, match=r"offers \[4, 8\] bits"):
        resolve_menu(loaded.inventory, MenuSettings(format="vllm", bits=(3, 4)))
    with pytest.raises(BitallocError, match="takes group sizes"):
        resolve_menu(loaded.inventory, MenuSettings(format="vllm", group_sizes=(16,)))
    with pytest.raises(BitallocError, match="cannot store"):
        PlanSettings(Budget(5.0), scorer="salience", menu=MenuSettings(format="vllm"))
    with pytest.raises(BitallocError, match="unquantized"):
        MenuSettings(format="vllm", embeddings=True)
    options, notices = resolve_menu(loaded.inventory, MenuSettings(format="vllm"))
    assert {o.name for o in options} == {o.name for o in ALL_SCHEMES}
    assert any("fused" in n for n in notices) and any("zero points" in n for n in notices)


def test_plan_cli_defaults_to_symmetric_w4_w8_and_says_what_it_tied(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", tiny, "--format", "vllm", "--bpw", "6", "--scorer", "rtn-mse", "--no-imatrix",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fused layers" in err and "qkv" in err and "gate_up" in err
    plan = Plan.load(str(out))
    assert {(o.bits, o.symmetric) for o in plan.assignment.values()} <= {(4, True), (8, True)}
    assert all(isinstance(o, WNA16Option) for o in plan.assignment.values())
