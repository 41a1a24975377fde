"""bench/webrtc.py runs end to end (--quick) against a real `wavecast serve` on 127.0.0.1 and writes its JSON.

Timings on CI are noise, so this checks the shape of the results and that the numbers are positive, not speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wavecast.streaming.engine import BUFFER_FRAMES

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shipped" / "default"


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="no shipped default model yet")
def test_webrtc_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "bench/webrtc.py", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "first audio after offer" in proc.stdout and "control -> heard, data channel" in proc.stdout
    r = json.loads(out.read_text())

    assert r["settings"]["reps"] == 3 and r["settings"]["buffer_frames"] == BUFFER_FRAMES
    assert positive(r["smoothing_s"]) and all(positive(v) for v in r["smoothing_ms"].values())
    for ref in r["render_reference"].values():  # the same pitch analysis on a clockless render
        assert ref["heard_ms"] is None or positive(ref["heard_ms"])
    keys = ["offer_to_first_audio_ms", "offer_to_answer_ms", "answer_to_open_ms", "open_to_first_audio_ms",
            "datachannel", "datachannel_ack", "datachannel_moved_ms", "datachannel_delivery_ms", "http", "http_ack",
            "http_moved_ms", "http_delivery_ms"]
    assert set(keys) <= r["latency"].keys()
    for key in ("offer_to_first_audio_ms", "offer_to_answer_ms", "answer_to_open_ms", "datachannel_ack", "http_ack"):
        x = r["latency"][key]
        assert x["n"] == 3 and all(positive(x[k]) for k in ("median", "p90", "max")), (key, x)
    # open -> first frame and delivery (heard minus a render reference) are differences: finite, of either sign
    for key in ("datachannel", "datachannel_moved_ms", "http", "http_moved_ms", "open_to_first_audio_ms",
                "datachannel_delivery_ms", "http_delivery_ms"):
        x = r["latency"][key]  # a loaded CI machine may miss a change (n < 3)
        ok = positive if key in ("datachannel", "datachannel_moved_ms", "http", "http_moved_ms") else math.isfinite
        assert x["n"] + x["missed"] == 3 and all(ok(x[k]) for k in ("median", "p90", "max") if k in x), (key, x)
    assert r["latency"]["datachannel"]["n"] + r["latency"]["http"]["n"] > 0  # at least one change was heard

    c = r["continuity"]
    assert positive(c["frames"]) and all(
        count(c[k]) for k in ("silent_frames", "gap_frames", "startup_silent_frames", "underruns"))
    assert len(r["reps"]) == 3
    for rep in r["reps"]:
        assert rep["datachannel"]["target"] != rep["http"]["target"]  # steered away and back
    assert {rep["datachannel"]["target"] for rep in r["reps"]} == {440.0, 660.0}  # directions alternate

    # control -> heard over both routes, and the client's jitter buffer's share, measured
    assert positive(r["control_to_heard_ms_p50"]) and r["control_to_heard_ms_p95"] >= r["control_to_heard_ms_p50"]
    assert positive(r["jitter_buffer_ms"])
    # one stream with 1 and 20 listeners: the daemon's CPU and one encoder for all of them
    lc = r["listener_cpu"]
    assert positive(r["listener_cpu_ratio_20"]) and r["listener_cpu_ratio_20"] == lc["ratio"]
    assert lc["one"]["encoders"] == lc["many"]["encoders"] == 1 and lc["many"]["peers"] == 20
    assert all(positive(lc[k]["cpu_per_s"]) and positive(lc[k]["packets_per_s"]) for k in ("one", "many"))
