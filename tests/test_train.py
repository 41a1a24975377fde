"""`wavecast train instrument --quick`: data, training, export, verification and publishing, for real."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, wavecast_command
from wavecast.models.quality import log_mel
from wavecast.models.store import SHIPPED, ModelStore
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


@pytest.mark.slow
def test_training_can_start_from_an_instrument_in_the_store(tmp_path: Path) -> None:
    """--init: a run starts from a stored instrument's weights (refused before any data work when it names no
    instrument, or one whose graph is not what its manifest says), and its manifest says which."""
    store, work = tmp_path / "store", tmp_path / "work"
    broken = store / "broken" / "000001"  # the shipped default under another name, its graph damaged
    broken.mkdir(parents=True)
    manifest = json.loads((SHIPPED / "default" / "model.json").read_text()) | {"name": "broken", "version": 1}
    (broken / "model.json").write_text(json.dumps(manifest))
    (broken / "model.onnx").write_bytes((SHIPPED / "default" / "model.onnx").read_bytes()[:-100])
    base = [*wavecast_command(), "train", "instrument", "--quick", "--work", str(work), "--store", str(store)]
    for ref, says in (("folk", "'folk' is a composer; start from an instrument"), ("nope", "unknown model 'nope'"),
                      ("broken", "does not match field 'onnx.sha256'")):
        refused = subprocess.run([*base, "--init", ref], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr[-2000:]
    assert not (work / "data").exists()
    cmd = [*base, "--init", "default", "--steps", "1", "--lr", "1e-7", "--name", "warm"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warm, default = (FrameModel(ModelStore(store).resolve(n).directory) for n in ("warm", "default"))
    assert warm.manifest.training["init"] == {"model": "default", "version": default.manifest.version,
                                              "sha256": default.manifest.onnx["sha256"]}
    # One tiny step on from the default's weights, it plays the default's sound (a fresh model would not).
    tone = {"f0": 440.0, "loudness": -20.0}
    gap = np.abs(log_mel(render(warm, 1.0, 0, tone)) - log_mel(render(default, 1.0, 0, tone))).mean()
    assert gap < 0.05, gap
    # With --brightness from a model without it: the new control is there and starts out doing nothing (its
    # weights at zero), so the run starts from the default's sound at any brightness.
    result = subprocess.run([*cmd[:-1], "bright", "--brightness"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    bright = FrameModel(ModelStore(store).resolve("bright").directory)
    assert [c.name for c in bright.manifest.controls] == ["f0", "loudness", "brightness"]
    assert bright.manifest.training["model"]["brightness"] is True
    for value in (0.0, 1.0):
        gap = np.abs(log_mel(render(bright, 1.0, 0, tone | {"brightness": value}))
                     - log_mel(render(default, 1.0, 0, tone))).mean()
        assert gap < 0.05, (value, gap)
    # and a model with brightness does not start one without it
    refused = subprocess.run([*base, "--init", "bright"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "has a brightness control; train with --brightness" in refused.stderr


def test_onset_crops_start_just_before_a_note() -> None:
    """`--crops onset`: every crop starts ONSET_LEAD frames before a note begins (a new key after silence or
    another key), so its first note is heard from the onset; plain crops start anywhere."""
    from wavecast.models.data import HOP, Performance
    from wavecast.models.train import ONSET_LEAD, onset_starts, sample_batch

    keys = np.repeat([60, 62, 62, 67, 67, 64], 40)  # two held keys: notes of 80 frames
    f0 = (440.0 * 2 ** ((keys - 69) / 12)).astype(np.float32)
    loudness = np.full(len(f0), -20.0, np.float32)
    loudness[150:160] = -80.0  # a rest in the second: 67 begins again at 160
    perf = Performance(f0, loudness, np.zeros(len(f0) * HOP, np.float32), np.full(len(f0), 0.5, np.float32))
    [starts] = onset_starts([perf], 30)
    assert (starts + ONSET_LEAD).tolist() == [40, 120, 160, 200]  # 0 has no lead; 240 leaves no room for 30 frames
    rng = np.random.default_rng(0)
    control = sample_batch([perf], 64, 30, rng, 4, 3, [starts])[0].numpy()
    first = control[:, ONSET_LEAD]
    assert np.all((control[:, ONSET_LEAD - 1, 0] != first[:, 0]) | (control[:, ONSET_LEAD - 1, 1] < -60))
    assert len({round(float(f), 2) for f in first[:, 0]}) == 3 and np.all(control[:, :, 2] == 0.5)
    anywhere = sample_batch([perf], 64, 30, rng, 4)[0].numpy()
    assert anywhere.shape == (64, 30, 2)
    assert np.mean(anywhere[:, ONSET_LEAD - 1, 0] == anywhere[:, ONSET_LEAD, 0]) > 0.8
