"""Stages report their own seconds and peak resident memory, of bitalloc's
process and of a helper process, not the run's peak so far."""

import json
import subprocess
import sys

import pytest

from bitalloc.stages import STAGE_HEADERS, Stages, peak_rss_mb, reset_peak, stage_rows

pytestmark = pytest.mark.skipif(not reset_peak(), reason="needs Linux's /proc/self/clear_refs")


_TWO_STAGES = """
import json, time
import numpy as np
from bitalloc.stages import Stages
stages = Stages()
with stages("big", units=4):
    block = np.ones(300_000_000 // 8)  # 300 MB, every page touched
    del block
with stages("small"):
    time.sleep(0.05)
print(json.dumps(stages.to_dict()))
"""


def test_each_stage_reports_its_own_peak():
    # in a fresh process: the suite's own (gigabytes resident, torch's threads) made the figures flaky
    out = subprocess.run([sys.executable, "-c", _TWO_STAGES], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    big, small = rows["big"], rows["small"]
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 250  # the second stage does not inherit the first's peak
    assert small["seconds"] >= 0.05 and big["units"] == 4
    assert [r[0] for r in stage_rows(rows)] == ["big", "small"]
    assert len(stage_rows(rows)[0]) == len(STAGE_HEADERS)


def test_a_helper_process_peak_is_reported_beside_the_stage():
    child = subprocess.Popen([sys.executable, "-c", "import sys, numpy; a = numpy.ones(25_000_000); "
                              "print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # 200 MB held by the child
        stages = Stages(children=lambda: [child.pid])
        with stages("helper"):
            pass
        assert stages.rows["helper"]["helper_peak_rss_mb"] >= 200
        assert stages.rows["helper"]["peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.5)
    finally:
        child.stdin.close()
        child.wait()


def test_an_unknown_process_has_no_peak():
    assert peak_rss_mb(2**22 + 12345) is None
