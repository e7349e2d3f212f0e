"""Every bad input in ``bad_inputs.CASES``: exit status 2, one line on stderr
without a traceback, no new or changed file, and (unless the case depends on
the model) no model loaded. The table in docs/bad-inputs.md must match."""

from __future__ import annotations

import re

import pytest

import bad_inputs as B


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    return root, B.build_workspace(root)


SEEN: dict[str, str] = {}  # case id -> message, filled by the cases, read by the docs check


def _refuse_loading(*_args, **_kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("case", B.CASES, ids=[c.id for c in B.CASES])
def test_bad_input_is_refused_in_one_line(case, workspace, monkeypatch):
    root, ws = workspace
    monkeypatch.chdir(root)
    if not case.loads:
        monkeypatch.setattr("bitalloc.api.load", _refuse_loading)
        monkeypatch.setattr("bitalloc.export.native.load_quantized", _refuse_loading)
    before = B.snapshot(root)
    outcome = B.run_case(case, ws)
    lines = outcome.stderr.strip().splitlines()
    assert outcome.code == case.code, outcome.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert re.search(case.expect, lines[0]), lines[0]
    assert B.snapshot(root) == before, "the command created or changed files"
    SEEN[case.id] = B.normalise(outcome.stderr, ws, root)


def test_there_are_at_least_60_distinct_cases_over_every_command():
    assert len({c.id for c in B.CASES}) == len(B.CASES) >= 60
    commands = {c.argv[0] for c in B.CASES if c.argv}
    assert {"plan", "quantize", "eval", "run", "compare", "demo"} <= commands


def test_the_docs_table_is_current(workspace):
    root, ws = workspace
    rows = [(case, SEEN.get(case.id) or B.normalise(B.run_case(case, ws).stderr, ws, root)) for case in B.CASES]
    expected = B.render(rows)
    assert B.DOC.is_file() and B.DOC.read_text() == expected, (
        "docs/bad-inputs.md is out of date: run `.venv/bin/python tests/bad_inputs.py`")
