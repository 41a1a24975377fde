"""bench/watermark.py --quick runs end to end on the shipped models and writes every figure of issue 21.

The quick run judges one marked clip per attack and nine unmarked clips, so its percentages say little; this checks
that every attack, source and section is there, that a clean marked clip reads back with its payload, that no
unmarked clip reads as marked, and that the mark stays 30 dB under the audio in its own bands. About a minute on a
busy 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHIPPED_INSTRUMENTS
from wavecast.models import data

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = ["none", "opus 64k", "opus 32k", "resample 44.1k", "gain -12 dB", "gain +6 dB", "under speech 0 dB",
           "under speech +6 dB", "cut 2 s", "44.1k, opus 64k"]


@pytest.mark.skipif(shutil.which("fluidsynth") is None or not data.SOUNDFONT.exists(),
                    reason="needs the fluidsynth binary and the GM soundfont (Debian: fluidsynth fluid-soundfont-gm)")
def test_watermark_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "bench/watermark.py", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "== Detection of marked" in proc.stdout and "== Targets" in proc.stdout
    r = json.loads(out.read_text())
    assert r["date"] == r["created"][:10] and "cores" in r["machine"]
    assert all(name in r["model"] for name in ("default v", "violin v", "cello v", "clarinet v", "folk v"))
    s = r["summary"]

    rows = {row["attack"]: row for row in s["detection"]}
    assert sorted(rows) == sorted(ATTACKS) and all(row["clips"] == 1 for row in rows.values())
    clean = rows["none"]  # a marked clip as the engine made it reads back, with the payload it carries
    assert clean["overall"] == 100.0 and clean["bit_errors"] == 0 and clean["min_score"] >= r["threshold"]
    marked = [row for clip in r["clips"] if clip["kind"] == "piece" for row in clip["marked"]]
    assert {row["attack"] for row in marked} == set(ATTACKS)
    assert all(row["bit_errors"] is None or 0 <= row["bit_errors"] <= 32 for row in marked)
    cut = next(row for row in marked if row["attack"] == "cut 2 s")
    assert 1.0 <= cut["cut_at_s"] <= 9.0

    fp = s["false_positives"]
    assert {x["source"] for x in fp["sources"]} == {"engine render", "fluidsynth", "white", "pink", "speech"}
    assert fp["clips"] == 9 and fp["detected"] == 0 and fp["max_score"] < r["threshold"] == 7.0
    assert 0 <= fp["near"] <= 9 and 0 < fp["near_expected"] < 9 * 0.01  # ~2.6e-3 a clip at z >= 6.5

    gates = {g["name"]: g for g in s["gates"]}
    assert set(gates) == set(SHIPPED_INSTRUMENTS) >= {"default", "violin", "cello", "clarinet", "trumpet", "flute"}
    for g in gates.values():
        assert g["pass_off"] is True and isinstance(g["pass_on"], bool), g  # the shipped models pass unmarked
        assert math.isfinite(g["distance_change_pct"]) and g["distance_on"] > 0
    level = s["mark_level"]
    assert level["min_db_mark_bands"] >= 30.0  # the mark is ALPHA (30.5 dB) under the audio in each of its bands
    assert len(level["per_third_octave_min_db"]) == len(level["third_octave_centres_hz"]) == 23

    cost = r["engine_cost"]
    assert cost["streams"] == 32 and cost["tick_ms_with"] > 0 and cost["tick_ms_without"] > 0
    assert cost["marker_ms"] > 0 and math.isfinite(cost["share"])
    assert len(r["targets"]) == 9 and all({"figure", "value", "target", "pass"} <= set(t) for t in r["targets"])
    assert proc.stdout.count("MISS") >= sum(not t["pass"] for t in r["targets"])
