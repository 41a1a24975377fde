"""bench/engine.py and bench/composer.py run end to end (--quick) on the shipped models and write the JSON they promise.

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

from tests.conftest import SHIPPED_INSTRUMENTS

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shipped" / "default"


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="no shipped default model yet")
def test_engine_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "bench/engine.py", "--quick", "--model-dir", str(MODEL), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Engine tick" in proc.stdout and "x real time" in proc.stdout
    r = json.loads(out.read_text())

    assert r["model_detail"]["hop"] > 0 and r["model_detail"]["sample_rate"] > 0
    for key in ("streams_per_core_256", "overhead_fraction_256", "batched_vs_looped_64", "batched_vs_looped_256",
                "control_to_sent_ms_p95", "model", "machine", "date"):
        assert key in r, key  # the headline keys exist (None where --quick does not measure 256 streams)
    assert r["model"].startswith("default v") and r["date"] == r["created"][:10]
    lat = r["control_latency"]
    # a control change shows in the packets sent within the budget (40 ms in the bench; loose here for CI load)
    assert lat["missed"] == 0 and 0 < lat["p50_ms"] <= lat["p95_ms"] < 200 and positive(r["control_to_sent_ms_p95"])
    assert [row["tau_ms"] for row in r["smoothing"]] == [0.0, 30.0]
    assert [row["streams"] for row in r["ticks"]] == [1, 16]
    for row in r["ticks"]:
        for key in ("median_us", "p99_us", "us_per_stream_frame", "realtime_factor", "ort_call_us"):
            assert positive(row[key]), (key, row)
        assert row["ticks"] >= 5
    for row in r["batching"]:
        assert all(positive(row[k]) for k in ("batched_us_per_stream", "loop_us_per_stream", "ratio")), row
    torch_part = r["ort_vs_torch"]
    assert "skipped" in torch_part or all(positive(x[k]) for x in torch_part["rows"] for k in ("ort_us", "torch_us"))

    mem = r["memory"]
    assert all(positive(mem[k]) for k in ("state_bytes", "ring_bytes", "total_bytes", "traced_bytes"))
    assert mem["total_bytes"] >= mem["state_bytes"] + mem["ring_bytes"]

    assert [row["f0"] for row in r["pitch"]] == [55.0, 110.0, 220.0, 440.0, 880.0, 1760.0]
    for row in r["pitch"]:  # measured may be None where no pitch is found; the bench reports, it does not judge
        assert row["measured"] is None or positive(row["measured"])

    roof = r["roofline"]
    assert "skipped" in roof or all(positive(roof[k]) for k in ("macs_per_frame", "peak_gflops", "fraction"))
    prof = r["profile"]
    assert prof["rows"][-1]["op"] == "(total)" and positive(prof["rows"][-1]["us_b1"])
    assert "cuda_ticks" not in r  # only with --device cuda


def test_composer_bench_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "bench/composer.py", "--quick", "--out", str(out), "--png", str(png)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "in scale 100.0%" in proc.stdout and "composer step" in proc.stdout
    r = json.loads(out.read_text())
    f = r["figures"]
    assert f["notes"] >= 5 and f["in_scale_fraction"] == 1.0 and f["phrases"] >= 1
    assert 0 <= f["repeated_shape_fraction"] <= 1 and r["first_notes"][0]["bar"] == 1
    assert f["clicks"] == 0 and f["clicks_with_pause_play_reset"] == 0
    assert {(row["control"], row["value"]) for row in r["control_response"]} >= {("density", 0.0), ("register", "high")}
    assert all(positive(row["per_note_us"]) for row in r["step_cost"])
    assert Path(r["midi"]).read_bytes().startswith(b"MThd") and Path(r["wav"]).stat().st_size > 0
    assert png.stat().st_size > 0 if isinstance(r["plot"], str) else "skipped" in r["plot"]


def test_musicality_bench_composed_minutes(tmp_path: Path) -> None:
    """One composed minute per instrument beside FluidSynth; the other parts have runs of their own."""
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "bench/musicality.py", "--seeds", "1", "--skip", "headroom", "composer",
                           "instruments", "--out", str(out), "--img", str(png)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "in-phrase frames below -60 dBFS" in proc.stdout
    c = json.loads(out.read_text())["composed"]
    assert c["minutes"] == len(SHIPPED_INSTRUMENTS) == 6 and c["in_phrase_silent_fraction"] <= 0.02  # one each
    assert 0 < c["repeated_bar_fraction"] <= 1 and 0 < c["tonic_ending_fraction"] <= 1
    assert all(positive(r["mfcc_frechet"]["to_fluidsynth"]) for r in c["rows"] if "mfcc_frechet" in r)
    assert png.stat().st_size > 0
