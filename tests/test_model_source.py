"""The streamed path (``model.source``): weights read from disk one tensor at
a time give the same units, identity, error table, plan and quantized folder
as the model loaded by transformers, and fit under a memory cap below the
checkpoint's size, where loading the model does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from test_model_units import SMALL, build

from bitalloc import api
from bitalloc.model.loading import resolve_source
from bitalloc.model.source import open_source, skeleton, streamed_inventory
from bitalloc.model.units import find_units, get_weight

HERE = Path(__file__).resolve().parent

FAMILIES = {  # config class -> extra settings; each saved by transformers in its own checkpoint layout
    "LlamaConfig": {"tie_word_embeddings": True},
    "Qwen2Config": {"tie_word_embeddings": False},
    "GPT2Config": None,  # Conv1D weights stored (in, out)
    "MixtralConfig": {"num_local_experts": 4, "num_experts_per_tok": 2},  # fused experts, per-expert keys on disk
}


def _saved(tmp_path, config: str, extra) -> tuple[str, torch.nn.Module]:
    if extra is None:
        model = build(config, n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)
    else:
        model = build(config, **SMALL, **extra)
    folder = tmp_path / config
    model.save_pretrained(folder, max_shard_size="20KB")  # many shards
    return str(folder), model


@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_streamed_units_identity_and_weights_equal_the_loaded_model(tmp_path, config):
    folder, _ = _saved(tmp_path, config, FAMILIES[config])
    assert len(list(Path(folder).glob("*.safetensors"))) > 2
    loaded = api.load(folder, embeddings=True)
    source = resolve_source(folder)
    model = skeleton(source)
    assert all(p.is_meta for p in model.parameters())
    weights = open_source(source, model)
    inventory = streamed_inventory(model, weights, embeddings=True)
    assert inventory == loaded.inventory  # units, kept tensors, ties, identity and content identity
    for name, p in loaded.model.named_parameters():
        assert torch.equal(weights.parameter(name), p.detach().float()), name
    for unit in inventory.units:
        assert torch.equal(weights.weight(unit), get_weight(loaded.model, unit)), unit.name


def test_a_checkpoint_with_other_weights_has_another_identity(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    ids = []
    for folder in (a, b):
        source = resolve_source(str(folder))
        model = skeleton(source)
        ids.append(streamed_inventory(model, open_source(source, model)).content_id)
    assert ids[0] != ids[1]
    assert ids[0] == find_units(tiny_llama(seed=0)).content_id


def test_streamed_plan_and_folder_equal_the_in_memory_ones(tmp_path, monkeypatch):
    """In-process, the whole pipeline: same table, plan file and quantized
    folder byte for byte (the sweep caches apart, so both measure)."""
    folder = tmp_path / "model"
    tiny_llama(seed=3, tie_word_embeddings=False).save_pretrained(folder, max_shard_size="30KB")
    char_tokenizer().save_pretrained(folder)
    out = {}
    for mode in ("memory", "stream"):
        monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / f"cache-{mode}"))
        stream = mode == "stream"
        loaded = api.load(str(folder), stream=stream, progress=False)
        settings = api.PlanSettings(api.Budget(3.5), guard=False, menu=api.MenuSettings(imatrix=False))
        api.plan(settings=settings, loaded=loaded, out=str(tmp_path / f"plan-{mode}.json"),
                 save_table=str(tmp_path / f"table-{mode}.json"), progress=False)
        api.quantize(plan_path=str(tmp_path / f"plan-{mode}.json"), out=str(tmp_path / f"q-{mode}"), loaded=loaded,
                     progress=False)
        out[mode] = [(tmp_path / f"plan-{mode}.json").read_bytes(), (tmp_path / f"table-{mode}.json").read_bytes()]
        out[mode] += [(tmp_path / f"q-{mode}" / f).read_bytes() for f in ("model.safetensors", "bitalloc.json")]
    assert out["memory"] == out["stream"]


CAP_MB = 110  # address space the command may add once its libraries are loaded


def _capped(args: list[str], cache: Path, cap: float = CAP_MB) -> subprocess.CompletedProcess:
    env = {**os.environ, "BITALLOC_CACHE": str(cache), "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "262144",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "capped.py"), str(cap), "--quiet", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_streamed_path_fits_a_memory_cap_below_the_checkpoint_and_matches_loading(tmp_path):
    """A 165 MB float32 checkpoint in 16 MB shards. Streamed under a 110 MB
    cap, `plan --stream` and `quantize --stream` write the same table, plan
    and quantized folder as the in-memory commands (run without the cap);
    the in-memory plan under the same cap fails, so the cap binds."""
    folder = tmp_path / "model"
    tiny_llama(seed=1, hidden_size=256, intermediate_size=768, num_hidden_layers=48, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False).save_pretrained(
        folder, max_shard_size="16MB")
    char_tokenizer().save_pretrained(folder)
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    assert size_mb > 1.4 * CAP_MB and len(list(folder.glob("*.safetensors"))) >= 8
    menu = ["--bits", "3,4", "--group-sizes", "64,128", "--bpw", "3.5"]
    files = {}
    for mode, flags, cap in (("memory", ["--no-guard", "--no-imatrix"], 1e6), ("stream", ["--stream"], CAP_MB)):
        plan, table, q = tmp_path / f"plan-{mode}.json", tmp_path / f"table-{mode}.json", tmp_path / f"q-{mode}"
        for args in (["plan", "--model", str(folder), *menu, *flags, "--out", str(plan), "--save-table", str(table)],
                     ["quantize", "--model", str(folder), "--plan", str(plan), "--out", str(q),
                      *(["--stream"] if mode == "stream" else [])]):
            done = _capped(args, tmp_path / f"cache-{mode}", cap)
            assert done.returncode == 0, done.stderr[-2000:]
            peak = float(done.stderr.split("peak address space ")[1].split(" MB")[0])
            assert mode == "memory" or peak < CAP_MB
        files[mode] = [plan.read_bytes(), table.read_bytes()] + [(q / f).read_bytes() for f in sorted(os.listdir(q))]
    assert files["memory"] == files["stream"]
    failed = _capped(["plan", "--model", str(folder), *menu, "--no-guard", "--no-imatrix", "--out",
                      str(tmp_path / "plan-capped.json")], tmp_path / "cache-capped")
    assert failed.returncode != 0 and not (tmp_path / "plan-capped.json").exists()
