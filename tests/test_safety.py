"""Nothing lost: outputs never clobber what bitalloc did not write, a killed
save leaves the previous output intact and the next run clean, damaged files
are caught on load, and the same inputs give the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BitallocError, PlanMismatchError
from bitalloc.fileio import OLD_TAG, TMP_TAG
from bitalloc.solve.problem import Budget
from conftest import char_tokenizer, tiny_llama


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), folders as 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def work(tiny_dir, tmp_path):
    """A tiny model, two plans for it (different budgets) and one quantized folder."""
    plans = {}
    for bpw in (3.5, 5.0):
        plans[bpw] = str(tmp_path / f"plan-{bpw}.json")
        assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", str(bpw), "--out", plans[bpw]]) == 0
    return {"model": tiny_dir, "plans": plans, "root": tmp_path}


def quantize(work, bpw, out, *extra):
    return main(["--quiet", "quantize", "--model", work["model"], "--plan", work["plans"][bpw], "--out", str(out),
                 *extra])


def test_non_empty_folder_and_file_are_refused_and_left_identical(work, capsys):
    folder = work["root"] / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    afile = work["root"] / "afile"
    afile.write_text("precious")
    before = tree(work["root"])
    assert quantize(work, 3.5, folder) == 2
    assert "did not write" in capsys.readouterr().err
    assert quantize(work, 3.5, afile) == 2
    assert "existing file" in capsys.readouterr().err
    assert tree(work["root"]) == before


def test_a_bitalloc_output_with_a_foreign_file_inside_is_refused(work, capsys):
    out = work["root"] / "q"
    assert quantize(work, 3.5, out) == 0
    (out / "my-readme.md").write_text("added by the user")
    before = tree(work["root"])
    assert quantize(work, 5.0, out) == 2
    assert "my-readme.md" in capsys.readouterr().err
    assert tree(work["root"]) == before
    assert quantize(work, 5.0, out, "--overwrite") == 0
    assert not (out / "my-readme.md").exists()


def test_replacing_a_bitalloc_output_swaps_it_whole(work):
    out = work["root"] / "q"
    assert quantize(work, 3.5, out) == 0
    first = tree(out)
    assert quantize(work, 5.0, out) == 0
    second = tree(out)
    assert second != first and set(second) == set(first)
    assert not [p for p in work["root"].iterdir() if TMP_TAG in p.name or OLD_TAG in p.name]


def test_two_quantize_runs_give_identical_bytes_and_honour_the_umask(work):
    old = os.umask(0o027)
    try:
        assert quantize(work, 3.5, work["root"] / "a") == 0
        assert quantize(work, 3.5, work["root"] / "b") == 0
    finally:
        os.umask(old)
    a, b = tree(work["root"] / "a"), tree(work["root"] / "b")
    assert a == b and "model.safetensors" in a
    assert (work["root"] / "a").stat().st_mode & 0o777 == 0o750
    for p in (work["root"] / "a").iterdir():
        assert p.stat().st_mode & 0o777 == 0o640, p.name


def test_plans_and_tables_are_reproducible(work, tmp_path):
    for name in ("x", "y"):
        assert main(["--quiet", "plan", "--model", work["model"], "--bpw", "4", "--out", str(tmp_path / f"{name}.json"),
                     "--save-table", str(tmp_path / f"{name}-table.json")]) == 0
    assert (tmp_path / "x.json").read_bytes() == (tmp_path / "y.json").read_bytes()
    assert (tmp_path / "x-table.json").read_bytes() == (tmp_path / "y-table.json").read_bytes()


@pytest.mark.parametrize("where", ["size", "middle"])
def test_a_changed_byte_in_a_quantized_folder_is_caught_on_load(work, where, capsys):
    from bitalloc.export.native import load_quantized

    out = work["root"] / "q"
    assert quantize(work, 3.5, out) == 0
    target = out / "model.safetensors"
    data = bytearray(target.read_bytes())
    if where == "size":
        data += b"\x00"
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BitallocError, match="does not match the sha256"):
        load_quantized(str(out))
    assert main(["--quiet", "eval", "--quantized", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


KILLER = r"""
import os, signal, sys
import bitalloc.fileio as F
import bitalloc.export.native as Q
from bitalloc.cli import main

stage = sys.argv[1]
def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

if stage == "filling":  # model.safetensors written, manifest not yet
    Q.file_digest = die
elif stage == "before-swap":  # the new folder complete, not yet in place
    F._honour_umask = die
elif stage == "after-swap":  # the new folder in place, the old one not yet deleted
    real_remove = F._remove
    F._remove = lambda p: die() if F.TMP_TAG in p.name else real_remove(p)
elif stage == "between-renames":  # kernels without an atomic exchange: two renames
    F._exchange = lambda a, b: False
    real_replace, real_name = F.os.replace, F._temp_name
    armed = []
    def temp_name(path, tag=F.TMP_TAG):
        if tag == F.OLD_TAG:
            armed.append(1)
        return real_name(path, tag)
    def replace(a, b):
        if armed and F.TMP_TAG in os.path.basename(str(a)):
            die()
        real_replace(a, b)
    F._temp_name, F.os.replace = temp_name, replace
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("stage", ["filling", "before-swap", "after-swap", "between-renames"])
def test_kill_9_during_a_save_keeps_an_intact_output_and_the_next_run_cleans_up(work, stage):
    out = work["root"] / "q"
    assert quantize(work, 3.5, out) == 0
    old = tree(out)
    argv = ["--quiet", "quantize", "--model", work["model"], "--plan", work["plans"][5.0], "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", KILLER, stage, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in work["root"].iterdir() if TMP_TAG in p.name or OLD_TAG in p.name]
    if stage == "after-swap":
        assert tree(out) != old and leftovers  # the new output is whole; the old one awaits deletion
        from bitalloc.export.native import read_manifest

        read_manifest(str(out))
    elif stage == "between-renames":
        assert not out.exists() and leftovers  # the old output sits under its temporary name
    else:
        assert tree(out) == old and leftovers
    # the next run restores or removes what the killed one left, then succeeds
    assert quantize(work, 3.5, out) == 0
    assert tree(out) == old
    assert not [p for p in work["root"].iterdir() if TMP_TAG in p.name or OLD_TAG in p.name]


def test_an_interrupted_save_folder_is_refused_by_eval(work, capsys):
    half = work["root"] / f".q{TMP_TAG}999999-abcd"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main(["--quiet", "eval", "--quantized", str(half)]) == 2
    assert "no bitalloc.json" in capsys.readouterr().err


def test_a_fine_tune_of_the_same_architecture_gets_its_own_measurements(tmp_path, text_file):
    """Same names and shapes, other weights: another content identity, so no
    cached Hessian or error table of the first serves the second."""
    from bitalloc.calib.grams import CalibSettings, cached_hessians
    from bitalloc.table import ErrorTable
    from bitalloc.evaluate.text import read_text_file

    base = tiny_llama(seed=0)
    tuned = tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # changes what layer 1 sees
    paths = {}
    for name, m in (("base", base), ("tuned", tuned)):
        paths[name] = tmp_path / name
        m.save_pretrained(paths[name])
        char_tokenizer().save_pretrained(paths[name])
    a, b = api.load(str(paths["base"])), api.load(str(paths["tuned"]))
    assert a.inventory.identity == b.inventory.identity
    assert a.inventory.content_id != b.inventory.content_id
    settings = api.PlanSettings(Budget(4.0))
    table = tmp_path / "table.json"
    api.plan(settings=settings, loaded=a, save_table=str(table), progress=False)
    with pytest.raises(PlanMismatchError, match="another model or checkpoint"):
        api.plan(settings=settings, loaded=b, table=ErrorTable.load(str(table)), progress=False)
    text, calib = read_text_file(text_file), CalibSettings(2, 32)
    Ha = cached_hessians(a.model, a.inventory, a.tokenizer, text, calib)
    Hb = cached_hessians(b.model, b.inventory, b.tokenizer, text, calib)
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(Ha["model.layers.0.self_attn.q_proj"], Hb["model.layers.0.self_attn.q_proj"])
    assert not torch.equal(Ha[name], Hb[name])


def test_damaged_caches_are_measured_again(tiny_dir, text_file, monkeypatch, tmp_path):
    from bitalloc.calib.grams import CalibSettings, accumulate_hessians, cached_hessians, calibration_windows
    from bitalloc.evaluate.text import read_text_file

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    loaded = api.load(tiny_dir)
    text, calib = read_text_file(text_file), CalibSettings(2, 32)
    first = cached_hessians(loaded.model, loaded.inventory, loaded.tokenizer, text, calib)
    [cache] = (tmp_path / "cache" / "hessians").glob("*.safetensors")
    [routing] = (tmp_path / "cache" / "hessians").glob("*.routing.json")  # routing statistics beside it
    assert any(first[a] is first[b] for a in first for b in first if a != b)  # q/k/v share one tensor in memory
    reread = cached_hessians(loaded.model, loaded.inventory, loaded.tokenizer, text, calib)  # stored once each
    assert set(reread) == set(first) and all(torch.equal(reread[k], first[k]) for k in first)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    again = cached_hessians(loaded.model, loaded.inventory, loaded.tokenizer, text, calib)
    fresh = accumulate_hessians(loaded.model, loaded.inventory, calibration_windows(loaded.tokenizer, text, calib))
    assert set(again) == set(first) and all(torch.allclose(again[k], fresh[k]) for k in fresh)
    assert cache.stat().st_size > 100  # replaced by a whole file
    routing.write_text("{not json")  # a damaged routing file: measured again too
    cached_hessians(loaded.model, loaded.inventory, loaded.tokenizer, text, calib)
    assert routing.read_text() == "{}"  # a dense model has no experts to route


def test_two_unit_sets_of_one_model_keep_their_own_calibration(tiny_dir, text_file, monkeypatch, tmp_path):
    """A GGUF menu plans the output matrix, the integer menu does not: the
    importance vectors of each unit set are cached apart, so planning one
    after the other reads both back instead of measuring each again."""
    from dataclasses import replace

    import bitalloc.calib.grams as grams
    from bitalloc.evaluate.text import read_text_file

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    measured = []
    real = grams.accumulate_calibration
    monkeypatch.setattr(grams, "accumulate_calibration", lambda *a, **k: measured.append(1) or real(*a, **k))
    loaded = api.load(tiny_dir)
    whole = loaded.inventory
    fewer = replace(whole, units=tuple(u for u in whole.units if u.name != "model.layers.1.mlp.down_proj"))
    text, calib = read_text_file(text_file), grams.CalibSettings(2, 32)
    first = grams.importance_vectors(loaded.model, whole, loaded.tokenizer, text, calib)
    grams.importance_vectors(loaded.model, fewer, loaded.tokenizer, text, calib)
    assert len(measured) == 2 and len(list((tmp_path / "cache" / "imatrix").iterdir())) == 2
    again = grams.importance_vectors(loaded.model, whole, loaded.tokenizer, text, calib)
    assert len(measured) == 2  # read back, not measured over the other set's file
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_a_damaged_probe_cache_is_measured_again(tiny_dir, text_file, monkeypatch, tmp_path):
    from bitalloc.scorers import score

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    loaded = api.load(tiny_dir)
    settings = api.PlanSettings(Budget(4.0), scorer="kl", calib_text=text_file,
                                scorer_settings=api.ScorerSettings(probe_windows=1, probe_seq_len=32))
    first = score(api.scoring_context(loaded, settings, progress=None), ["kl"])["kl"]
    [cache] = (tmp_path / "cache" / "probes").iterdir()
    cache.write_text('{"version": 1, "units": {"model.layers.0.self_attn.q_proj": "oops", "bogus": [1, 2, 3]}}')
    again = score(api.scoring_context(loaded, settings, progress=None), ["kl"])["kl"]
    assert (again.distortion == first.distortion).all()


def test_probe_cache_is_keyed_by_the_scales(tiny_dir, text_file, monkeypatch, tmp_path):
    """kl probes measured with plain min/max scales are not reused for a plan
    with the importance-weighted search (nor across search versions or
    calibration windows): each
    gets its own cache file, and the searched table equals one measured with
    no cache at all."""
    from dataclasses import replace

    from bitalloc.scorers import probes, score

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    probe = api.ScorerSettings(probe_windows=1, probe_seq_len=32)
    plain_settings = api.PlanSettings(Budget(4.0), scorer="kl", calib_text=text_file, scorer_settings=probe,
                                      menu=replace(api.PlanSettings(Budget(4.0)).menu, imatrix=False))
    loaded = api.load(tiny_dir)
    plain = score(api.scoring_context(loaded, plain_settings, progress=None), ["kl"])["kl"]
    loaded, searched_settings = api.prepare(loaded, replace(plain_settings, menu=replace(plain_settings.menu,
                                                                                         imatrix=True)), False)
    assert loaded.importance
    searched = score(api.scoring_context(loaded, searched_settings, progress=None), ["kl"])["kl"]
    cache = tmp_path / "cache" / "probes"
    assert len(list(cache.iterdir())) == 2
    assert not (plain.distortion == searched.distortion).all()
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "fresh"))
    fresh = score(api.scoring_context(loaded, searched_settings, progress=None), ["kl"])["kl"]
    assert (fresh.distortion == searched.distortion).all()
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probes, "SCALE_SEARCH_VERSION", 99)
    score(api.scoring_context(loaded, searched_settings, progress=None), ["kl"])
    assert len(list(cache.iterdir())) == 3
    from bitalloc.calib.grams import CalibSettings  # other calibration windows (GPTQ probes use their Hessians)

    score(api.scoring_context(loaded, replace(plain_settings, calib=CalibSettings(3, 32)), progress=None), ["kl"])
    assert len(list(cache.iterdir())) == 4


def test_the_weight_error_sweep_is_cached_and_keyed(tiny_dir, text_file, monkeypatch, tmp_path):
    """The sweep's reductions are read back from disk (the quantizer is not
    run again), each cached row equals the error computed directly for that
    unit and option, an interrupted sweep measures only the missing units,
    and other scales, search versions or calibration get other files."""
    from dataclasses import replace

    from bitalloc.calib.grams import CalibSettings
    from bitalloc.formats.affine_rtn import fake_quantize
    from bitalloc.scorers import context, score
    from bitalloc.model.units import get_weight

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "errors"
    base = api.PlanSettings(Budget(4.0), scorer="taylor", calib_text=text_file, calib=CalibSettings(2, 32))
    base = replace(base, menu=replace(base.menu, bits=(3, 4)))  # 12 options: four sweeps stay cheap
    loaded, settings = api.prepare(api.load(tiny_dir), base, False)
    first = score(api.scoring_context(loaded, settings, progress=None), ["rtn-mse", "taylor"])
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["mse", "taylor"]

    calls = []
    real = context.fake_quantize
    monkeypatch.setattr(context, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = score(api.scoring_context(loaded, settings, progress=None), ["rtn-mse", "taylor"])
    assert calls == []
    assert all(np.array_equal(again[k].distortion, first[k].distortion, equal_nan=True) for k in first)
    table = again["rtn-mse"]
    unit = loaded.inventory.units[3]
    j = next(j for j, o in enumerate(table.options) if o.name == "int3-g32-asym")
    W = get_weight(loaded.model, unit)
    direct = float(((W - fake_quantize(W, table.options[j], importance=loaded.importance[unit.name])).double() ** 2).sum())
    assert table.distortion[table.unit_names.index(unit.name), j] == direct

    [mse] = cache.glob("mse-*.json")  # an interrupted sweep: two units missing
    data = json.loads(mse.read_text())
    missing = [u.name for u in loaded.inventory.units[:2]]
    for name in missing:
        del data["units"][name]
    mse.write_text(json.dumps(data))
    calls.clear()
    resumed = score(api.scoring_context(loaded, settings, progress=None), ["rtn-mse"])["rtn-mse"]
    fitting = sum(1 for u in loaded.inventory.units[:2] for j in range(len(table.options))
                  if not np.isnan(first["rtn-mse"].distortion[table.unit_names.index(u.name), j]))
    assert len(calls) == fitting and np.array_equal(resumed.distortion, first["rtn-mse"].distortion, equal_nan=True)

    plain = replace(settings, menu=replace(settings.menu, imatrix=False))
    score(api.scoring_context(api.load(tiny_dir), plain, progress=None), ["rtn-mse"])  # min/max scales
    assert len(list(cache.glob("mse-*.json"))) == 2
    version = context.SCALE_SEARCH_VERSION
    monkeypatch.setattr(context, "SCALE_SEARCH_VERSION", 99)
    score(api.scoring_context(loaded, settings, progress=None), ["rtn-mse"])
    assert len(list(cache.glob("mse-*.json"))) == 3
    monkeypatch.setattr(context, "SCALE_SEARCH_VERSION", version)
    other = replace(settings, calib=CalibSettings(3, 32))  # taylor reads calibration; mse does not
    score(api.scoring_context(loaded, other, progress=None), ["rtn-mse", "taylor"])
    assert len(list(cache.glob("mse-*.json"))) == 3 and len(list(cache.glob("taylor-*.json"))) == 2
