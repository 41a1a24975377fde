"""bench/soak.py for 60 s against a real `wavecast serve`: storms and bad input must not hurt the daemon.

Underruns are reported, not asserted: whether a 2-core machine shared with other work keeps every stream
real-time is a measurement (bench/RESULTS.md), not something a test can promise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_soak_60_seconds(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "bench/soak.py", "--minutes", "1", "--sample", "2", "--test-streams", "2",
                           "--playing", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.is_file(), proc.stderr[-4000:]
    r = json.loads(out.read_text())
    report = proc.stdout + proc.stderr[-2000:]

    # the exit status says whether every target was met
    assert proc.returncode == (0 if r["ok"] else 1), report
    assert r["ok"] == all(r["targets"].values())
    assert r["seconds"] >= 59 and r["streams"] >= 0.75 * r["admission_cap"] > 0

    assert r["http"]["server_errors"] == [], report  # no 5xx to anything sent during the run
    assert r["http"]["dropped_without_response"] == [], report
    assert r["bad_inputs"]["sent"] >= r["bad_inputs"]["cases"], report  # the whole corpus went at least once
    assert r["bad_inputs"]["not_4xx"] == [], report
    assert sum(int(n) for s, n in r["patches"].items() if s != "200") == 0 and r["patches"]["200"] > 100, report

    dc = r["datachannel"]
    assert dc["sent"] > 100 and dc["unanswered"] == 0 and dc["wrong_replies"] == {}, report
    assert r["peers_lost"] == [], report  # no input closed a peer, no peer failed

    assert r["targets"]["healthy"] and r["health"]["status"] == "ok", report
    assert r["rss"]["flat"] and r["fds"]["flat"], (r["rss"], r["fds"])

    listeners = r["listeners"]
    assert listeners["joined"] >= 20 and listeners["left"] >= 20 and listeners["join_failures"] == 0, report
    for anchor in listeners["anchors"].values():  # audio arrived the whole time, at the level it was asked for
        assert anchor["frames"] >= 50 * 55, anchor
        assert anchor["audible_frames"] >= 0.9 * anchor["frames"] and -30 <= anchor["level_db"] <= -10, anchor
    assert all(n > 50 * 55 for n in r["light_listener_packets"]), r["light_listener_packets"]
