import pytest

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic, write_json
from bitalloc.evaluate.text import clean_article, split_articles, wiki_text


def test_calibration_and_evaluation_text_never_overlap():
    ev, cal = wiki_text("eval"), wiki_text("calib")
    assert len(ev) > 500_000 and len(cal) > 500_000
    ev_par = set(p for p in ev.split("\n\n") if len(p) > 80)
    cal_par = set(p for p in cal.split("\n\n") if len(p) > 80)
    assert not ev_par & cal_par
    assert "[[" not in ev and "{{" not in ev and "'''" not in ev


def test_split_is_by_alternating_article():
    parts = split_articles(["a0", "a1", "a2", "a3", "a4"])
    assert parts == {"eval": "a0\n\na2\n\na4", "calib": "a1\n\na3"}


def test_clean_article_keeps_prose_only():
    raw = "==History==\n'''Bold''' words make a sentence that is long enough to count as prose here.\nCaption\n"
    assert clean_article(raw) == "Bold words make a sentence that is long enough to count as prose here."


def test_unknown_part():
    with pytest.raises(BitallocError):
        wiki_text("train")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")


def test_wikitext2_without_datasets_or_network_is_a_clear_error(monkeypatch):
    import sys

    from bitalloc.evaluate.text import read_text_file

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(BitallocError, match="needs the package datasets"):
        read_text_file("wikitext2")
