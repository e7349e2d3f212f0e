"""llama.cpp in a child process (bitalloc.evaluate.llamacpp): the same numbers
as llama-cpp-python's own high-level API, and a native crash in llama.cpp
reported as one line while bitalloc lives on (the runner restarts the child;
`compare` keeps the rows it finished).

These run a GGUF through llama.cpp in the default (not slow) tier, so a
llama.cpp library that cannot run on this machine fails the suite here, in
a test named for it, rather than killing pytest halfway."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitalloc.cli import main
from bitalloc.evaluate import llamacpp
from bitalloc.evaluate.llamacpp import LlamaCpp, LlamaCppCrash

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_export_gguf import tiny_model, write_tiny_gguf

    path = tmp_path_factory.mktemp("runner") / "tiny.gguf"
    write_tiny_gguf(tiny_model(), path, tokenizer=True)
    return path


def rows(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_child_matches_llama_cpp_python(tiny_gguf):
    """The child's log-probs equal those of llama-cpp-python's Llama.eval
    (its own batching and context code) bit for bit, and evaluate's sums are
    the hand sums of those log-probs."""
    import llama_cpp

    windows = rows()
    with LlamaCpp() as runner:
        stored = runner.logprobs(tiny_gguf, windows)
        ours = stored.load()
        result = runner.evaluate(tiny_gguf, windows, stored)
        info = runner.system_info
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), logits_all=True, n_ctx=24, n_batch=24, n_ubatch=24,
                          n_threads=2, n_threads_batch=2, verbose=False)
    for row, mine in zip(windows, ours):
        llm.reset()
        llm.eval(row.tolist())
        theirs = F.log_softmax(torch.from_numpy(np.array(llm.scores[:23], dtype=np.float32)), dim=-1)
        assert torch.equal(mine, theirs)
    llm.close()
    nll = -sum(float(lp.gather(1, r[1:, None]).sum()) for lp, r in zip(ours, windows))
    assert result.tokens == 2 * 23 and result.nll == pytest.approx(nll / 46, rel=1e-6)
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.top1 == 1.0  # the file against itself
    assert "AMX" not in info, "this llama.cpp was built with AMX, which faults on some virtual machines (README)"


def test_crash_is_one_error_and_the_runner_recovers(tiny_gguf, tmp_path):
    crashing = tmp_path / "crash.gguf"
    crashing.write_bytes(tiny_gguf.read_bytes())
    windows = rows(1, 8)
    with LlamaCpp(serve="llamacpp_faults:segfault_on_marked") as runner:
        good = runner.evaluate(tiny_gguf, windows)
        with pytest.raises(LlamaCppCrash, match=r"crashed \(SIGSEGV, segmentation fault\) while running .*crash\.gguf"):
            runner.evaluate(crashing, windows)
        again = runner.evaluate(tiny_gguf, windows)  # a new child
    assert again.nll == good.nll


def test_illegal_instruction_with_amx_retries_without_extra_buffer_types(tiny_gguf):
    windows = rows(1, 8)
    with LlamaCpp() as plain:
        expected = plain.evaluate(tiny_gguf, windows)
    with LlamaCpp(serve="llamacpp_faults:sigill_with_amx") as runner:
        result = runner.evaluate(tiny_gguf, windows)
        assert not runner.options.extra_bufts
        assert len(runner.notices) == 1 and "without its extra buffer types" in runner.notices[0]
    assert result.nll == pytest.approx(expected.nll, rel=1e-5)


def test_illegal_instruction_names_the_rebuild(tiny_gguf):
    with LlamaCpp(serve="llamacpp_faults:sigill_always") as runner:
        with pytest.raises(LlamaCppCrash, match=r"SIGILL.*make llama-cpp"):
            runner.evaluate(tiny_gguf, rows(1, 8))


def test_compare_keeps_finished_rows_when_llamacpp_crashes(tiny_gguf, tmp_path, capsys, monkeypatch):
    """The preset's row is measured, then llama.cpp dies on bitalloc's file:
    exit 1, one line naming the crash, the file and where the finished rows
    are; compare.json/.md hold the preset's row and say where it stopped."""
    monkeypatch.setattr(llamacpp, "SERVE", "llamacpp_faults:segfault_on_bitalloc_files")
    out = tmp_path / "cmp"
    code = main(["--quiet", "compare", "--model", str(tiny_gguf), "--format", "gguf", "--presets", "Q4_K_M",
                 "--scorers", "rtn-mse-rel", "--no-imatrix", "--windows", "2", "--seq-len", "16",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # (transformers' GGUF loader draws its own bar when tqdm was imported before --quiet could turn it off)
    assert not [line for line in err if "llama" in line and not line.startswith("error")]  # llama.cpp's log kept
    errors = [line for line in err if line.startswith("error")]
    assert len(errors) == 1 and errors[0] == err[-1] and errors[0].startswith("error: llama.cpp crashed (SIGSEGV")
    assert "bitalloc-rtn-mse-rel-Q4_K_M.gguf" in errors[0] and f"{out}/compare.md" in errors[0]
    report = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["llama.cpp Q4_K_M"]
    assert report["rows"][0]["tokens"] == 2 * 15 and "SIGSEGV" in report["stopped"]
    assert "stopped early" in (out / "compare.md").read_text()
