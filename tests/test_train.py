"""`wavecast train instrument --quick`: data, training, export, verification and publishing, for real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, wavecast_command
from wavecast.models.store import ModelStore
from wavecast.streaming.analysis import estimate_f0
from wavecast.streaming.engine import render
from wavecast.streaming.model import FrameModel

pytest.importorskip("torch", reason="training needs the 'train' extra: ./install train")


@pytest.mark.slow
def test_quick_training_publishes_a_verified_model(tmp_path: Path) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    cmd = [*wavecast_command(), "train", "instrument", "--quick", "--name", "quick", "--work", str(work),
           "--store", str(store)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published quick v1" in result.stderr
    entry = ModelStore(store).resolve("quick")
    model = FrameModel(entry.directory)
    m = model.manifest
    assert m.training["command"].startswith("wavecast train instrument --quick")
    assert m.training["steps"] == 600 and m.training["data"]["program"] == 73
    assert m.training["mel_weight"] == 1.0  # the default: a log-mel term beside the spectral loss
    assert m.verification["parity"]["steps"] >= 200 and m.verification["parity"]["max_abs_audio"] < 1e-4
    assert m.verification["quality"]["heldout_seconds"] == 8.0 and m.verification["quality"]["clicks"] == 0
    assert set(m.verification["thresholds"]) >= {"spectral_ratio", "pitch_p95_cents", "loudness_correlation",
                                                  "table_ratio", "onset_table_ratio"}
    timbre = m.verification["quality"]["log_mel_l1"]  # on voiced frames, onsets apart, beside the per-key table
    assert timbre["frames"]["all"] > 300 and timbre["frames"]["onset"] > 30, timbre
    assert timbre["all"]["model"] <= 1.1 * timbre["all"]["table"] < timbre["all"]["silence"] / 4, timbre
    audio = render(model, 1.0, 0, {"f0": 440.0, "loudness": -20.0})
    assert abs(estimate_f0(audio[24_000:], 48_000) / 440 - 1) < 0.01
    # A finished run leaves no checkpoint behind to resume from.
    assert list((work / "runs").glob("quick-*.pt")) == []
