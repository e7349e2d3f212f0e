"""Inputs too big to read whole, figures a user copies from a message, tables
that contradict themselves, a full disk and SIGTERM: what bitalloc does with
them, measured from outside (peak memory of a child process, exit status,
stderr), the expected values computed here by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitalloc.cli import main
from bitalloc.errors import BitallocError

def _big_text(path: Path, megabytes: int) -> Path:
    """``megabytes`` of English prose: the offline evaluation text repeated."""
    from bitalloc.evaluate.text import wiki_text

    block = wiki_text("eval")[:1 << 20]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(megabytes):
            f.write(block)
    return path


def _peak_rss_mb(argv: list[str], cwd: Path) -> float:
    """Peak resident memory (MB) of a fresh Python running `bitalloc ARGV`."""
    code = textwrap.dedent(f"""
        import resource, sys
        from bitalloc.cli import main
        rc = main({argv!r})
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK")]
    assert line, out.stderr[-2000:]
    _, kb, rc = line[-1].split()
    assert rc == "0", out.stderr[-2000:]
    return int(kb) / 1024


def test_eval_and_calibration_memory_does_not_grow_with_the_file(tiny_dir, tmp_path):
    """Evaluation windows (2 x 64 tokens) and calibration windows (4 x 64),
    from text files of 6 MB and 48 MB: the peak memory of the whole command
    differs by less than 24 MB between the two sizes (the 42 MB extra would
    be at least that much as text alone, and several times it tokenized)."""
    small, large = _big_text(tmp_path / "small.txt", 6), _big_text(tmp_path / "large.txt", 48)
    peaks = {}
    for name, path in (("small", small), ("large", large)):
        peaks["eval", name] = _peak_rss_mb(["--quiet", "eval", "--model", tiny_dir, "--text", str(path), "--windows",
                                            "2", "--seq-len", "64"], tmp_path)
        peaks["calib", name] = _peak_rss_mb(["--quiet", "plan", "--model", tiny_dir, "--bpw", "4", "--calib-text",
                                             str(path), "--calib-windows", "4", "--calib-seq-len", "64", "--out",
                                             str(tmp_path / f"plan-{name}.json")], tmp_path)
    print({k: round(v) for k, v in peaks.items()})
    for kind in ("eval", "calib"):
        assert abs(peaks[kind, "large"] - peaks[kind, "small"]) < 24, peaks


def test_a_large_file_gives_the_same_evaluation_tokens_as_reading_it_whole(tmp_path):
    """Evaluation windows from a large file read as far as they need are the
    windows of the whole text (SmolLM2's byte-level BPE tokenizer: the prefix
    is tokenized in one call, its last tokens a margin that is not used)."""
    from bitalloc.evaluate import EvalSettings, token_windows
    from bitalloc.model.loading import embedded_source, load_tokenizer
    from bitalloc.evaluate.text import SMALL_TEXT_BYTES, LargeText, read_text_file

    path = _big_text(tmp_path / "big.txt", SMALL_TEXT_BYTES // (1 << 20) + 1)
    text = read_text_file(str(path))
    assert isinstance(text, LargeText) and text.size == path.stat().st_size
    tok = load_tokenizer(embedded_source())
    settings = EvalSettings(seq_len=512, windows=40)  # 20,440 tokens: past the first 64 KB, so the prefix doubles
    whole = token_windows(tok, path.read_text()[:1 << 20], settings)
    assert token_windows(tok, text, settings).equal(whole)


def test_text_that_is_not_a_regular_file_or_not_text(tmp_path):
    from bitalloc.evaluate.text import read_text_file

    with pytest.raises(BitallocError, match="is not a regular file"):
        read_text_file("/dev/zero")
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"x" * (5 << 20) + b"\xff\xfe")  # large, undecodable past its first chunk
    text = read_text_file(str(bad))
    from bitalloc.evaluate.text import LargeText

    assert isinstance(text, LargeText)
    with pytest.raises(BitallocError, match="is not valid utf-8"):
        list(text.chunks())


def test_shown_feasible_bounds_are_themselves_feasible():
    """The range an infeasible budget's message shows is rounded inwards:
    the lower bound up, the upper bound down, at 4 decimals."""
    from bitalloc.solve.problem import shown_bound

    assert shown_bound(2.2222222, "lo") == 2.2223
    assert shown_bound(2.2222222, "hi") == 2.2222
    assert shown_bound(9.0, "hi") == 9.0 and shown_bound(9.0, "lo") == 9.0
    assert shown_bound(4.00004, "lo") == 4.0001


def test_the_shown_minimum_is_accepted(tiny_dir, tmp_path, capsys):
    """`plan --bpw <the minimum the message shows>` plans; just below is refused."""
    code = main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "1", "--out", str(tmp_path / "p.json")])
    message = capsys.readouterr().err
    assert code == 2
    low = float(message.split("feasible budgets run from ")[1].split()[0])
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", f"{low}", "--no-guard",
                 "--out", str(tmp_path / "p.json")]) == 0, capsys.readouterr().err
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", f"{low - 0.0001:.4f}",
                 "--out", str(tmp_path / "q.json")]) == 2


def test_a_table_whose_distortion_rises_with_bits_is_named(tiny_dir, tmp_path, capsys):
    """rising_units names a unit whose distortion grows from int3 to int4 in
    one family, and `plan --table` says so in a notice."""
    from bitalloc.table import ErrorTable

    table_path, plan_path = tmp_path / "t.json", tmp_path / "p.json"
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "4", "--no-imatrix", "--out", str(plan_path),
                 "--save-table", str(table_path)]) == 0
    data = json.loads(table_path.read_text())
    names = data["options"]
    i3, i4 = names.index("int3-g32-asym"), names.index("int4-g32-asym")
    unit = sorted(data["units"])[0]
    row = data["units"][unit]["distortion"]
    row[i4] = row[i3] * 2  # more bits, more error
    table_path.write_text(json.dumps(data))
    assert ErrorTable.load(str(table_path)).rising_units() == [unit]
    capsys.readouterr()
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "4", "--no-imatrix", "--table", str(table_path),
                 "--out", str(plan_path), "--overwrite"]) == 0
    assert f"(e.g. {unit}) a larger distortion at more bits" in capsys.readouterr().err


def test_a_table_without_scorer_replans_with_the_scorer_it_was_made_by(tiny_dir, tmp_path):
    """`plan --table` without --scorer plans with the table's own scorer: the
    plan at another size equals the one scored afresh with that scorer."""
    table, direct, reused = tmp_path / "t.json", tmp_path / "direct.json", tmp_path / "reused.json"
    base = ["--quiet", "plan", "--model", tiny_dir, "--no-imatrix"]
    assert main([*base, "--scorer", "rtn-mse", "--bpw", "4", "--out", str(tmp_path / "p4.json"),
                 "--save-table", str(table)]) == 0
    assert main([*base, "--scorer", "rtn-mse", "--bpw", "3", "--out", str(direct)]) == 0
    assert main([*base, "--table", str(table), "--bpw", "3", "--out", str(reused)]) == 0
    a, b = json.loads(direct.read_text()), json.loads(reused.read_text())
    assert b["scorer"] == "rtn-mse"
    assert b["units"] == a["units"]


def test_a_full_disk_is_one_line_naming_the_path(tiny_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error type; the user gets
    the path and 'No space left on device', exit 1, and no folder."""
    import safetensors.torch

    def full(*_a, **_k):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    plan = tmp_path / "p.json"
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "4", "--no-imatrix", "--out", str(plan)]) == 0
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    code = main(["--quiet", "quantize", "--model", tiny_dir, "--plan", str(plan), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: No space left on device (") and str(tmp_path / "q") in err[0]
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.bitalloc-tmp-*"))


def test_sigterm_is_one_line_and_exit_143(tmp_path):
    """SIGTERM while a command runs: the temporary files go, one line says
    so, exit status 128 + 15."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from bitalloc import cli
        from bitalloc.cli import main
        def slow(args):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        cli.COMMANDS["plan"] = cli.COMMANDS["plan"]._replace(run=slow)
        sys.exit(main(["plan", "--bpw", "4", "--out", "p.json"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 143
    assert out.stderr.strip().splitlines() == ["error: terminated (SIGTERM); nothing was left half-written"]
